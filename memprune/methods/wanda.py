"""Wanda selection (Chavhan et al. 2024, weight granularity) and neuron granularity (z-score or ratio).

A weight edit (see memprune.methods): `edit(pipe, settings, memorized_stats=..., reference_stats=...)` selects, per
FeedForward output Linear and step, the weights that `memprune prune` zeroes. The statistics come from
`memprune.locate` (recorded memorized and reference prompts)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import MemPruneError
from ..masks import Masks, sparse_indices
from ..stats import NeuronStats
from .base import MethodInfo

METHOD = MethodInfo(
    name="wanda", kind="weight_edit",
    summary="Wanda scores |W|·a_mem of memorized vs reference prompts; per output row the top-k columns (k = ratio·H).",
    reference="Chavhan et al. 2024, Memorized Images in Diffusion Models share a Subspace "
              "that can be Located and Deleted",
    needs="statistics",
)

GRANULARITIES = ("weight", "neuron")
NEURON_SCORES = ("zscore", "ratio")


@dataclass
class SelectionSettings:
    """How many columns per output row are kept: a share `ratio` of the layer width H (k = floor(ratio·H), the
    paper's parameter) or, in the paper's units across models of different width, `k_per_row` itself."""

    ratio: float | None = 0.01
    granularity: str = "weight"
    neuron_score: str = "zscore"
    k_per_row: int | None = None

    def __post_init__(self):
        if self.k_per_row is not None:
            if self.ratio is not None:
                raise MemPruneError("Give --ratio or --k-per-row, not both.")
            if int(self.k_per_row) != self.k_per_row or self.k_per_row < 1:
                raise MemPruneError(f"--k-per-row must be a whole number of at least 1, got {self.k_per_row}.")
        elif self.ratio is None or not 0 < self.ratio <= 1:
            raise MemPruneError(f"--ratio must be in (0, 1], got {self.ratio}.")
        if self.granularity not in GRANULARITIES:
            raise MemPruneError(f"Unknown granularity '{self.granularity}': use weight or neuron.")
        if self.neuron_score not in NEURON_SCORES:
            raise MemPruneError(f"Unknown neuron score '{self.neuron_score}': use zscore or ratio.")


    def keep(self, width: int, layer: str = "a layer") -> int:
        """k, the columns kept per output row of a layer of input width H = `width`."""
        if self.k_per_row is None:
            assert self.ratio is not None  # __post_init__ refuses neither --ratio nor --k-per-row
            return keep_count(self.ratio, width)
        if self.k_per_row > width:
            raise MemPruneError(f"--k-per-row {self.k_per_row} is larger than the width {width} of {layer}: "
                                f"use at most {width}.")
        return int(self.k_per_row)


def settings_from_options(options: dict) -> SelectionSettings:
    """--ratio defaults to 0.01 unless --k-per-row is given (SelectionSettings refuses both)."""
    ratio, k_per_row = options.get("ratio"), options.get("k_per_row")
    if ratio is None and k_per_row is None:
        ratio = 0.01
    return SelectionSettings(ratio=ratio, k_per_row=k_per_row, granularity=options.get("granularity", "weight"),
                             neuron_score=options.get("neuron_score", "zscore"))


def keep_count(ratio: float, width: int) -> int:
    """k = floor(ratio · H) (a small epsilon absorbs float error: 0.1 · 250 must give 25, not 24)."""
    return math.floor(ratio * width + 1e-9)


def columns_kept(ratio: float | None, k: int | None, width: int) -> int:
    """k as given, else floor(ratio·H)."""
    if k is not None:
        return k
    if ratio is None:
        raise MemPruneError("Give a ratio or k.")
    return keep_count(ratio, width)


def ratio_for(k: int, width: int) -> float:
    """The ratio that keeps k columns of a width-H row: keep_count(ratio_for(k, H), H) == k."""
    return k / width


def wanda_mask(weight: torch.Tensor, a_mem: torch.Tensor, a_ref: torch.Tensor, ratio: float | None = None,
               k: int | None = None) -> torch.Tensor:
    """Per output row i keep the top-k columns of |W[i]| * a_mem (k given, or floor(ratio·H)), then only columns
    with a_mem > a_ref."""
    a_mem = a_mem.to(weight.device, torch.float32)
    a_ref = a_ref.to(weight.device, torch.float32)
    scores = weight.detach().abs().float() * a_mem[None, :]
    k = columns_kept(ratio, k, weight.shape[1])
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, scores.topk(k, dim=1).indices, True)
    return mask & (a_mem > a_ref)[None, :]


def neuron_scores(memorized, reference, score: str = "zscore") -> torch.Tensor:
    """NeMo-style z-score of the token-averaged activation, or the ratio of Wanda norms."""
    eps = 1e-8
    if score == "zscore":
        return (memorized.mean - reference.mean) / (reference.std + eps)
    return memorized.wanda_norm / (reference.wanda_norm + eps)


def neuron_mask(weight: torch.Tensor, memorized, reference, ratio: float | None = None, score: str = "zscore",
                k: int | None = None) -> torch.Tensor:
    """Top-k neurons (whole columns of W) by score, kept only where the score says 'more active than reference'."""
    scores = neuron_scores(memorized, reference, score).to(weight.device, torch.float32)
    k = columns_kept(ratio, k, weight.shape[1])
    columns = torch.zeros(weight.shape[1], dtype=torch.bool, device=weight.device)
    if k > 0:
        columns[scores.topk(k).indices] = True
    columns &= scores > (0.0 if score == "zscore" else 1.0)
    return columns[None, :].expand(weight.shape[0], -1).clone()


def select(
    weights: dict[str, torch.Tensor],
    memorized: NeuronStats,
    reference: NeuronStats,
    settings: SelectionSettings,
    steps: list[int] | None = None,
    meta: dict | None = None,
) -> Masks:
    """Masks for every (layer, step) recorded in both statistics; each made sparse as soon as it is selected, so
    only one dense mask exists at a time (all of them at once were ~30 GB for SDXL at 50 steps)."""
    steps = steps if steps is not None else memorized.steps
    indices: dict[tuple[str, int], torch.Tensor] = {}
    shapes: dict[str, tuple[int, int]] = {}
    kept = {layer: settings.keep(weight.shape[1], layer) for layer, weight in weights.items()}
    for layer, weight in weights.items():
        for step in steps:
            if (layer, step) not in memorized.accumulators or (layer, step) not in reference.accumulators:
                raise MemPruneError(f"No statistics for {layer} at step {step}: "
                                    "record both prompt sets with the same --steps.")
            mem, ref = memorized[(layer, step)], reference[(layer, step)]
            if settings.granularity == "weight":
                mask = wanda_mask(weight, mem.wanda_norm, ref.wanda_norm, k=kept[layer])
            else:
                mask = neuron_mask(weight, mem, ref, score=settings.neuron_score, k=kept[layer])
            indices[(layer, step)] = sparse_indices(mask)
            shapes[layer] = (mask.shape[0], mask.shape[1])
    # k per layer in the paper's units, so masks of models of different width can be set side by side
    return Masks(indices=indices, shapes=shapes,
                 meta={"selection": vars(settings).copy(), "k_per_row": kept, **(meta or {})})


def edit(pipe, settings: SelectionSettings, memorized_stats: NeuronStats, reference_stats: NeuronStats,
         steps: list[int] | None = None, meta: dict | None = None) -> Masks:
    """The weight-edit entry point: masks of `pipe`'s FeedForward output Linears from recorded statistics."""
    from ..models import denoiser, output_linears

    weights = {name: linear.weight for name, linear in output_linears(denoiser(pipe)).items()}
    return select(weights, memorized_stats, reference_stats, settings, steps=steps, meta=meta)
