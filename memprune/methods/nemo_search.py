"""NeMo's pure parts: its settings, the z-scores, the θ/top-k candidate search, the refinement and the neuron mask.

Nothing here runs a model: the memorization criterion is a function `broken(neurons) -> bool` given by the caller
(memprune.methods.nemo's NeMoRun), so every step can be checked against a hand computation.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import MemPruneError
from ..masks import Masks

LAYER_CHOICES = ("down_mid", "all")
Neurons = dict[str, list[int]]  # value-layer name -> neuron (output row) indices


@dataclass
class NeMoSettings:
    theta: float = 5.0  # first θ of the search (theirs: 5)
    theta_step: float = 0.25  # θ decrease per failed try (theirs: 0.25)
    min_theta: float = 1.0  # last θ tried (theirs: 1)
    top_k_step: int = 1  # top-|a| neurons per layer added per failed try (theirs: k += 1 from 0); 0: θ only
    two_sided: bool = True  # |z| > θ (theirs) or z > θ
    ssim_threshold: float | None = None  # None: mean + threshold_std * std of non-memorized pairwise SSIM
    threshold_std: float = 1.0
    calibration_prompts: int = 50  # non-memorized prompts for the threshold
    seeds: int = 10  # generations per prompt in the criterion (theirs: 10)
    seed: int = 0  # first seed
    steps: int = 50  # scheduler steps (only the first is run); also the steps the masks are stored at
    guidance_scale: float = 1.0  # the criterion's guidance, for detection and threshold alike (theirs detect at 0)
    batch_size: int = 8  # prompts (statistics) or seeds (criterion) per pipeline call
    layers: str = "down_mid"  # "down_mid" (their code) or "all" cross-attention value layers
    refine_unbroken: bool = True  # θ_min without breaking memorization: refine anyway (theirs) or select nothing

    def __post_init__(self):
        if self.layers not in LAYER_CHOICES:
            raise MemPruneError(f"Unknown NeMo layers '{self.layers}': use one of {', '.join(LAYER_CHOICES)}.")
        if self.seeds < 2:
            raise MemPruneError(f"NeMo compares seeds with each other: --seeds must be at least 2, got {self.seeds}.")
        if not self.guidance_scale >= 0:
            raise MemPruneError(f"NeMo's --guidance-scale must be 0 or more, got {self.guidance_scale}.")
        if self.steps < 1 or self.batch_size < 1 or self.calibration_prompts < 2:
            raise MemPruneError("NeMo needs --steps >= 1, --batch-size >= 1 and at least 2 calibration prompts.")
        if self.theta_step <= 0 or self.min_theta > self.theta:
            raise MemPruneError(f"NeMo's θ search needs theta_step > 0 and min_theta <= theta, got "
                                f"{self.theta_step} and {self.min_theta} > {self.theta}.")


def zscores(activations: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, two_sided: bool = True) -> torch.Tensor:
    """(a - mean) / std per neuron in float64; |z| when two-sided (NeMo). A zero std counts as 1e-12."""
    z = (activations.double() - mean.double()) / std.double().clamp_min(1e-12)
    return z.abs() if two_sided else z


def initial_candidates(z: dict[str, torch.Tensor], theta: float, activations: dict[str, torch.Tensor] | None = None,
                       k: int = 0) -> Neurons:
    """Per layer, the sorted neurons with z > θ, united with the k largest |activation| (NeMo's top-k)."""
    result = {}
    for layer, scores in z.items():
        chosen = set((scores > theta).nonzero().flatten().tolist())
        if k > 0 and activations is not None:
            values = activations[layer].abs()
            chosen |= set(values.topk(min(k, values.numel())).indices.tolist())
        result[layer] = sorted(chosen)
    return result


def count(neurons: Neurons) -> int:
    return sum(len(rows) for rows in neurons.values())


def theta_schedule(settings: NeMoSettings) -> list[tuple[float, int]]:
    """(θ, k) pairs tried in order: θ from `theta` down to `min_theta`, k growing by `top_k_step` per try."""
    pairs, theta, k = [], settings.theta, 0
    while theta >= settings.min_theta - 1e-9:
        pairs.append((round(theta, 10), k))
        theta -= settings.theta_step
        k += settings.top_k_step
    return pairs


@dataclass
class SearchResult:
    candidates: Neurons
    theta: float
    k: int
    broken: bool  # whether deactivating `candidates` breaks memorization
    tries: int


def search_theta(z: dict[str, torch.Tensor], activations: dict[str, torch.Tensor], broken: Callable[[Neurons], bool],
                 settings: NeMoSettings) -> SearchResult:
    """Lower θ (and raise k) until deactivating the candidates breaks memorization; stop at the first that does.
    Empty candidate sets are skipped (deactivating nothing cannot break anything), and so is a set equal to the one
    tried before it (the criterion is deterministic: it would give the same answer)."""
    tries, last = 0, None
    for theta, k in theta_schedule(settings):
        candidates = initial_candidates(z, theta, activations, k)
        if not count(candidates) or (last is not None and candidates == last[0]):
            continue
        tries += 1
        last = (candidates, theta, k)
        if broken(candidates):
            return SearchResult(candidates, theta, k, True, tries)
    if last is None:
        return SearchResult({layer: [] for layer in z}, settings.min_theta, 0, False, tries)
    return SearchResult(*last, False, tries)


def refine(candidates: Neurons, broken: Callable[[Neurons], bool]) -> Neurons:
    """NeMo's refinement: keep only candidates whose deactivation is needed for `broken` to stay true.

    First layer-wise (last layer first): drop a layer's candidates when memorization stays broken without them.
    Then neuron-wise in the remaining layers (last layer first, neurons in order): drop each neuron that is not
    needed. Assumes `broken(candidates)`; the result is a subset of the candidates."""
    current = {layer: list(rows) for layer, rows in candidates.items()}
    for layer in reversed(list(current)):
        if current[layer]:
            trial = {**current, layer: []}
            if broken(trial):
                current = trial
    for layer in reversed(list(current)):
        for neuron in list(current[layer]):
            trial = {**current, layer: [n for n in current[layer] if n != neuron]}
            if broken(trial):
                current = trial
    return current


def neuron_masks(neurons: Neurons, shapes: dict[str, tuple[int, int]], steps: int, meta: dict | None = None) -> Masks:
    """Whole rows of each value weight, the same at every step 0..steps-1 (NeMo is step-independent)."""
    indices = {}
    for layer, (_rows, columns) in shapes.items():
        selected = torch.tensor(sorted(set(neurons.get(layer, []))), dtype=torch.int64)
        flat = (selected[:, None] * columns + torch.arange(columns, dtype=torch.int64)[None, :]).flatten()
        for step in range(steps):
            indices[(layer, step)] = flat.clone()  # safetensors refuses tensors that share memory
    return Masks(indices=indices, shapes={layer: (shape[0], shape[1]) for layer, shape in shapes.items()},
                 meta={**(meta or {}), "step_independent": True})


def union(neuron_sets: list[Neurons]) -> Neurons:
    merged: dict[str, set[int]] = {}
    for neurons in neuron_sets:
        for layer, rows in neurons.items():
            merged.setdefault(layer, set()).update(rows)
    return {layer: sorted(rows) for layer, rows in merged.items()}

