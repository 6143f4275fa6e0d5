"""The metric primitives of evaluate (and of the attack and the sweep, which count copies the same way).

Copy threshold and memorization rate: a generation counts as a copy when its copy similarity is strictly above a
threshold calibrated on non-memorized generations (memprune.evaluation.scoring says which); diversity is the mean
pairwise similarity between the seeds of one prompt (higher = less diverse); attribute accuracy compares a
classifier's reading of general-caption generations with the attributes their captions name.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from ..errors import MemPruneError
from ..similarity import SimilarityBackend, mean_pairwise
from .classifier import AttributeClassifier


def calibrate_threshold(similarities, percentile: float = 95.0) -> float:
    """The copy threshold: the given percentile (linear interpolation, numpy's default) of non-memorized
    similarities."""
    values = np.asarray(similarities, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise MemPruneError("No non-memorized generations to calibrate the copy threshold on.")
    return float(np.percentile(values, percentile))


def strict_threshold(copy_similarity: dict, members: list[tuple[str, int]], percentile: float = 95.0) -> float | None:
    """The strict copy threshold: the percentile of the unedited control generations' similarity to their OWN
    training image (not the nearest of all known images), None when the controls have no training images.

    A same-style caption renders its own image's content without being a copy of it; above this, a generation
    resembles its training image more than a non-memorized caption's generation resembles its own."""
    own = np.concatenate([copy_similarity["unedited", source][i] for source, i in members])
    return calibrate_threshold(own, percentile) if np.isfinite(own).any() else None


def memorization_rate(similarities, threshold: float) -> float:
    """Share of generations whose copy similarity is strictly above the threshold (NaN entries are left out)."""
    values = np.asarray(similarities, dtype=float)
    values = values[np.isfinite(values)]
    return float(np.mean(values > threshold)) if values.size else float("nan")


def diversity(backend: SimilarityBackend, features: torch.Tensor) -> float:
    """Mean over prompts of the mean pairwise similarity between seeds: features (prompts, seeds, ...)."""
    values = [mean_pairwise(backend, prompt_features) for prompt_features in features]
    values = [v for v in values if math.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def attribute_predictions(classifier: AttributeClassifier, images: torch.Tensor) -> list[dict[str, str]]:
    """The classifier's reading of every image, one {attribute: value} per image whatever shape it returns."""
    predictions = classifier(images)
    if isinstance(predictions, pd.DataFrame):
        predictions = predictions.to_dict("records")
    elif isinstance(predictions, dict):
        keys = list(predictions)
        predictions = [{k: predictions[k][i] for k in keys} for i in range(len(images))]
    predictions = list(predictions)
    if len(predictions) != len(images):
        raise MemPruneError(f"The attribute classifier returned {len(predictions)} predictions "
                            f"for {len(images)} images.")
    return predictions


def attribute_accuracy(predictions: list[dict], expected: list[dict]) -> float:
    """Share of (image, attribute) pairs predicted right, over the attributes both sides name (case-insensitive)."""
    alias = {"color": "colour"}
    hits = []
    for predicted, truth in zip(predictions, expected, strict=False):
        truth = {alias.get(k, k): v for k, v in truth.items() if v not in (None, "")}
        for key, value in predicted.items():
            key = alias.get(key, key)
            if key in truth:
                hits.append(str(value).strip().lower() == str(truth[key]).strip().lower())
    return float(np.mean(hits)) if hits else float("nan")
