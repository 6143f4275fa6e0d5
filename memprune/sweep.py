"""Pruning sweeps: memorization of held-out memorized prompts and utility, for masks at several sparsities
and τ, against size-matched random masks — the measurement behind the claim that a mask located on a few
memorized prompts removes memorization of the others (Chavhan et al. 2024), and its control.

The pipeline is edited in place and restored after each point (`apply_masks` / `undo`), so one loaded
model serves the whole sweep.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .evaluation.classifier import AttributeClassifier
from .evaluation.metrics import attribute_accuracy, attribute_predictions, memorization_rate
from .evaluation.run import generate_images
from .generate import GenerationSettings
from .masks import Masks, random_masks_like
from .prompts import PromptList
from .prune import apply_masks, undo
from .similarity import SimilarityBackend, load_image


@dataclass
class SweepSettings:
    ratios: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05, 0.1)
    k_per_row: tuple[int, ...] = ()  # further points in the paper's units (columns kept per output row)
    timesteps: tuple[int, ...] = (10,)
    random_controls: int = 2  # random masks of the same size per layer, per point
    generation: GenerationSettings = field(default_factory=lambda: GenerationSettings(steps=50, seeds=4, batch_size=16))


@dataclass
class Scorer:
    """Scores one model state: memorization rate / copy similarity of held-out memorized prompts, attribute accuracy."""

    held_out: PromptList  # memorized prompts NOT used to locate, with their training images
    threshold: float
    backend: SimilarityBackend
    generation: GenerationSettings
    general: PromptList | None = None
    classifier: AttributeClassifier | None = None
    _truth: torch.Tensor | None = None

    def _training_features(self, size) -> torch.Tensor:
        if self._truth is None:
            images = torch.stack([load_image(self.held_out.image(i), tuple(size)) for i in range(len(self.held_out))])
            self._truth = self.backend.features(images)
        return self._truth

    def __call__(self, pipe) -> dict[str, float]:
        images, _, _ = generate_images(pipe, self.held_out.prompts, self.generation, "held-out memorized", False)
        prompts, seeds = images.shape[:2]
        features = self.backend.features(images.flatten(0, 1))
        truth = self._training_features(images.shape[-2:]).repeat_interleave(seeds, dim=0)
        similarity = self.backend.paired(features, truth).numpy()
        scores = {"memorization_rate": memorization_rate(similarity, self.threshold),
                  "copy_similarity": float(np.mean(similarity))}
        if self.general is not None and self.classifier is not None:
            general, _, _ = generate_images(pipe, self.general.prompts, self.generation, "general", False)
            predictions = attribute_predictions(self.classifier, general.flatten(0, 1))
            expected = [{k: self.general.extra[k][i] for k in self.general.extra}
                        for i in range(len(self.general)) for _ in range(general.shape[1])]
            scores["attribute_accuracy"] = attribute_accuracy(predictions, expected)
        return scores


def zeroed_share(masks: Masks, timesteps: int) -> float:
    union = masks.union_indices(timesteps)
    total = sum(masks.shapes[layer][0] * masks.shapes[layer][1] for layer in union)
    return sum(idx.numel() for idx in union.values()) / total


def kept_per_row(masks: Masks) -> tuple[float, float]:
    """(smallest, largest) k over layers, from the masks' meta (NaN for masks that do not record it)."""
    kept = list(masks.meta.get("k_per_row", {}).values())
    return (min(kept), max(kept)) if kept else (float("nan"), float("nan"))


def pruning_sweep(pipe, masks_for_ratio: Callable[[float], Masks], score: Scorer, settings: SweepSettings,
                  progress: bool = True, masks_for_k: Callable[[int], Masks] | None = None) -> pd.DataFrame:
    """One row per (method, ratio or k per row, τ, control seed): the scores of the pruned model, plus the unpruned
    baseline. Points of `settings.k_per_row` need `masks_for_k`; their `ratio` is NaN, and every row records the
    smallest and largest k per row over layers (`k_min`, `k_max`) so ratios and k can be read in the same units."""
    nan = float("nan")
    rows = [{"method": "none", "ratio": 0.0, "k_per_row": nan, "k_min": 0, "k_max": 0, "timesteps": 0,
             "control_seed": -1, "zeroed_share": 0.0, **score(pipe)}]
    if settings.k_per_row and masks_for_k is None:
        raise ValueError("SweepSettings.k_per_row needs masks_for_k.")
    sizes = [(ratio, nan) for ratio in settings.ratios] + [(nan, k) for k in settings.k_per_row]
    points = [(size, tau) for size in sizes for tau in settings.timesteps]
    bar = tqdm(total=len(points) * (1 + settings.random_controls), desc="pruning sweep", disable=not progress)
    for (ratio, k), tau in points:
        if np.isfinite(ratio):
            located = masks_for_ratio(ratio)
        else:
            assert masks_for_k is not None  # refused above: k_per_row needs masks_for_k
            located = masks_for_k(int(k))
        k_min, k_max = kept_per_row(located)
        candidates = [("wanda", -1, located)] + [
            ("random", seed, random_masks_like(located, tau, seed)) for seed in range(settings.random_controls)
        ]
        for method, seed, masks in candidates:
            edit = apply_masks(pipe, masks, tau)
            try:
                rows.append({"method": method, "ratio": ratio, "k_per_row": k, "k_min": k_min, "k_max": k_max,
                             "timesteps": tau, "control_seed": seed, "zeroed_share": zeroed_share(masks, tau),
                             **score(pipe)})
            finally:
                undo(pipe, edit)
            bar.update(1)
    bar.close()
    return pd.DataFrame(rows)


def summarize_sweep(sweep: pd.DataFrame) -> pd.DataFrame:
    """Wanda vs the mean of its random controls, per (ratio or k per row, τ), with k's range over layers."""
    metrics = [c for c in ("memorization_rate", "copy_similarity", "attribute_accuracy") if c in sweep]
    keys = ["ratio", "k_per_row", "k_min", "k_max", "timesteps", "method"]
    sweep = sweep.assign(**{key: sweep[key] if key in sweep else float("nan") for key in keys[1:4]})
    table = (sweep[sweep.method != "none"].groupby(keys, dropna=False)[metrics + ["zeroed_share"]]
             .mean().unstack("method"))
    table.columns = [f"{metric} ({method})" for metric, method in table.columns]
    return table
