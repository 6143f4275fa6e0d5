"""From generated images to evaluate's two tables: one row per generation and the tidy metrics.

Copy threshold and memorization rate. When training images are known (an ``image`` column), a generation's *copy
similarity* is its similarity to its prompt's training image; the threshold is the `threshold_percentile` (95) of
the similarity of the unedited model's non-memorized generations to their *nearest* known training image (any
group), calibrated on ``same_style_control`` if present, else ``non_memorized``. Without training images (real SD)
the unedited model's generation of a memorized prompt stands in for its training image (NeMo's "SSCD gen"): the
threshold is the percentile of the unedited non-memorized generations' similarity to the nearest unedited memorized
generation, and the edited model's memorized generations count as copies when their similarity to the unedited
generation (same prompt and seed) is above it; the unedited model's rate is then undefined and not written.
Memorization rate = share of generations strictly above the threshold, over generations that have a copy reference.
One threshold (from the unedited model) serves every model. With training images, a second, *strict* threshold is
the same percentile of the unedited controls' similarity to their OWN training image (``copy_threshold_strict``,
``memorization_rate_strict``): damaged but recognisable copies count under it.

Detection: ``detection_score`` = Wen et al.'s noise norm (memprune.detect) averaged over a group's generations,
``detection_auc`` = ROC AUC of the per-prompt score (mean over seeds), all memorized prompts (positive) vs the row's
non-memorized group. ``seconds_per_image`` per model and group (and its ratio to the unedited model's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..detect import roc_summary
from ..prompts import PromptList
from ..similarity import SimilarityBackend, load_image
from .classifier import AttributeClassifier
from .fixed_thresholds import fixed_rates
from .inputs import Group, calibration_group
from .metrics import (
    attribute_accuracy,
    attribute_predictions,
    calibrate_threshold,
    diversity,
    memorization_rate,
    strict_threshold,
)
from .schema import COLUMNS, NON_MEMORIZED_GROUPS, sort_metrics

Key = tuple[str, str]  # (model, source)


@dataclass
class Generated:
    """What the generation loop produced, per (model, source): arrays are (prompts, seeds, ...)."""

    images: dict[Key, torch.Tensor]  # (P, S, 3, H, W) in [0, 1]
    detection_mean: dict[Key, np.ndarray]  # Wen's score averaged over steps (NaN without CFG)
    detection_first: dict[Key, np.ndarray]  # Wen's score at the first step
    seconds: dict[Key, float]  # generation time of the whole file

    def shape(self, source: str) -> tuple[int, int]:
        images = self.images["unedited", source]
        return images.shape[0], images.shape[1]

    def per_image_seconds(self, model: str, sources: set[str]) -> float:
        return (sum(self.seconds[model, s] for s in sources)
                / sum(self.images[model, s].shape[0] * self.images[model, s].shape[1] for s in sources))


@dataclass
class TrainingImages:
    """The known training images of every prompt file and their features; `pool` holds each distinct image once."""

    images: dict[str, list[torch.Tensor | None]]
    features: dict[str, list[torch.Tensor | None]]
    pool: list[torch.Tensor] = field(default_factory=list)


@dataclass
class Similarities:
    features: dict[Key, torch.Tensor]  # (P, S, ...) backend features of every generation
    copy: dict[Key, np.ndarray]  # (P, S) similarity to the prompt's training image, NaN where unknown
    to_unedited: dict[Key, np.ndarray]  # (P, S) similarity to the unedited generation of the same prompt and seed


@dataclass
class Threshold:
    value: float
    strict: float | None
    info: dict  # what run.json records
    mode: str  # "training_image" or "unedited_generation"
    calibrated_on: str  # the group
    nearest: dict[tuple[str, int], np.ndarray]  # (source, prompt) of the calibration group -> per-seed similarity
    fixed: tuple[float, ...] = ()  # --fixed-threshold values: memorization_rate@<t> beside the calibrated rate


@dataclass
class Scores:
    metrics: pd.DataFrame  # tidy: model, group, metric, value
    generations: pd.DataFrame  # one row per model, source, prompt and seed
    threshold: Threshold
    training_images: dict[str, list[torch.Tensor | None]]


def score(settings, backend: SimilarityBackend, sources: dict[str, PromptList], groups: dict[str, Group],
          models: list[str], generated: Generated, cfg: bool, classifier: AttributeClassifier | None) -> Scores:
    """Every metric of every model and group (module docstring); `settings` is the run's EvaluateSettings."""
    height, width = next(iter(generated.images.values())).shape[-2:]
    training = read_training_images(backend, sources, (height, width))
    similarities = similarities_of(backend, generated, training)
    threshold = calibrate(settings.threshold_percentile, backend, groups, training, similarities)
    threshold.fixed = tuple(settings.fixed_thresholds)
    if threshold.fixed:
        threshold.info["fixed"] = list(threshold.fixed)
    reference = copy_references(generated, groups, threshold.mode, similarities)
    attributes = attribute_scores(classifier, groups, sources, generated, models)
    generations = generation_table(settings.generation.seed, sources, generated, similarities, threshold, reference)
    rows = [("unedited", threshold.calibrated_on, "copy_threshold", threshold.value)]
    if threshold.strict is not None:
        rows.append(("unedited", threshold.calibrated_on, "copy_threshold_strict", threshold.strict))
    for model in models:
        for name, group in groups.items():
            rows += group_rows(model, name, group, settings.generation.seeds, backend, generated, similarities,
                               threshold, reference, attributes, cfg)
        if cfg:
            rows += detection_auc_rows(model, groups, generated)
    metrics = sort_metrics(pd.DataFrame(rows, columns=COLUMNS), models)
    return Scores(metrics, generations, threshold, training.images)


def read_training_images(backend: SimilarityBackend, sources: dict[str, PromptList],
                         size: tuple[int, int]) -> TrainingImages:
    training = TrainingImages({}, {})
    pool_paths = set()
    for source, prompts in sources.items():
        paths = prompts.images or [None] * len(prompts)
        training.images[source] = [load_image(path, size) if path else None for path in paths]
        known = {i: image for i, image in enumerate(training.images[source]) if image is not None}
        training.features[source] = [None] * len(prompts)
        if not known:
            continue
        encoded = backend.features(torch.stack(list(known.values())))
        for row, i in enumerate(known):
            training.features[source][i] = encoded[row]
            if paths[i] not in pool_paths:
                pool_paths.add(paths[i])
                training.pool.append(encoded[row])
    return training


def similarities_of(backend: SimilarityBackend, generated: Generated, training: TrainingImages) -> Similarities:
    features = {key: backend.features(value.flatten(0, 1)) for key, value in generated.images.items()}
    features = {key: value.view(*generated.images[key].shape[:2], *value.shape[1:]) for key, value in features.items()}
    copy, to_unedited = {}, {}
    for (model, source), feats in features.items():
        values = np.full(generated.shape(source), np.nan)
        for i, reference in enumerate(training.features[source]):
            if reference is not None:
                values[i] = backend.paired(feats[i], reference[None].expand_as(feats[i])).numpy()
        copy[model, source] = values
        if model != "unedited":
            unedited = features["unedited", source]
            to_unedited[model, source] = backend.paired(feats.flatten(0, 1), unedited.flatten(0, 1)).view(
                generated.shape(source)).numpy()
    return Similarities(features, copy, to_unedited)


def calibrate(percentile: float, backend: SimilarityBackend, groups: dict[str, Group], training: TrainingImages,
              similarities: Similarities) -> Threshold:
    """The copy threshold (and the strict one) from the unedited model's non-memorized generations."""
    features = similarities.features
    memorized_source = groups["memorized"].members[0][0]
    known = any(f is not None for f in training.features[memorized_source])
    mode = "training_image" if known else "unedited_generation"
    calibration = calibration_group(groups)
    members = groups[calibration].members
    calib_feats = torch.stack([features["unedited", source][i] for source, i in members]).flatten(0, 1)
    if mode == "training_image":
        pool_tensor = torch.stack(training.pool)
        pool_text = f"{len(training.pool)} known training images"
    else:
        pool_tensor = features["unedited", memorized_source].flatten(0, 1)
        pool_text = f"{len(pool_tensor)} unedited memorized generations (stand-ins for the training images)"
    nearest = backend.matrix(calib_feats, pool_tensor).max(dim=1).values.numpy()
    value = calibrate_threshold(nearest, percentile)
    info = {
        "value": value, "percentile": percentile, "calibrated_on": calibration,
        "mode": mode, "generations": int(len(nearest)),
        "description": f"{percentile:g}th percentile of the similarity of {len(nearest)} unedited "
                       f"{calibration} generations to their nearest of {pool_text}; backend {backend.name}",
    }
    strict = strict_threshold(similarities.copy, members, percentile) if mode == "training_image" else None
    if strict is not None:
        info["strict"] = {
            "value": strict, "percentile": percentile, "calibrated_on": calibration,
            "description": f"{percentile:g}th percentile of the similarity of the unedited "
                           f"{calibration} generations to their OWN training image; backend {backend.name}",
        }
    nearest_by_member = dict(zip(members, nearest.reshape(len(members), -1), strict=True))
    return Threshold(value, strict, info, mode, calibration, nearest_by_member)


def copy_references(generated: Generated, groups: dict[str, Group], mode: str,
                    similarities: Similarities) -> dict[Key, np.ndarray]:
    """The similarity each generation is compared with the threshold by (NaN where it has no copy reference)."""
    memorized_source = groups["memorized"].members[0][0]
    reference = {}
    for model, source in generated.images:
        if mode == "training_image":
            reference[model, source] = similarities.copy[model, source]
        elif model != "unedited" and source == memorized_source:
            reference[model, source] = similarities.to_unedited[model, source]
        else:
            reference[model, source] = np.full(generated.shape(source), np.nan)
    return reference


def attribute_scores(classifier: AttributeClassifier | None, groups: dict[str, Group], sources: dict[str, PromptList],
                     generated: Generated, models: list[str]) -> dict[str, float]:
    """attribute_accuracy of every model on the general captions (none without a classifier or that group)."""
    if classifier is None or "general" not in groups:
        return {}
    general_source = groups["general"].members[0][0]
    prompts = sources[general_source]
    expected = [{k: prompts.extra[k][i] for k in prompts.extra} for i in range(len(prompts))]
    accuracy = {}
    for model in models:
        batch = generated.images[model, general_source]
        predictions = attribute_predictions(classifier, batch.flatten(0, 1))
        truth = [expected[i] for i in range(batch.shape[0]) for _ in range(batch.shape[1])]
        accuracy[model] = attribute_accuracy(predictions, truth)
    return accuracy


def generation_table(first_seed: int, sources: dict[str, PromptList], generated: Generated, similarities: Similarities,
                     threshold: Threshold, reference: dict[Key, np.ndarray]) -> pd.DataFrame:
    records = []
    for (model, source), images in generated.images.items():
        prompts = sources[source]
        for i in range(images.shape[0]):
            for s in range(images.shape[1]):
                near = threshold.nearest.get((source, i))
                value = reference[model, source][i, s]
                records.append({
                    "model": model, "source": source, "prompt_index": i, "caption": prompts.prompts[i],
                    "seed": first_seed + s,
                    "copy_similarity": similarities.copy[model, source][i, s],
                    "similarity_to_unedited": (similarities.to_unedited[model, source][i, s]
                                               if model != "unedited" else np.nan),
                    "nearest_training_similarity": near[s] if near is not None and model == "unedited" else np.nan,
                    "copy_reference_similarity": value,
                    "is_copy": value > threshold.value if np.isfinite(value) else np.nan,
                    "is_copy_strict": (value > threshold.strict
                                       if threshold.strict is not None and np.isfinite(value) else np.nan),
                    "detection_score": generated.detection_mean[model, source][i, s],
                    "detection_score_first_step": generated.detection_first[model, source][i, s],
                })
    return pd.DataFrame(records)


def _pick(table: dict[Key, np.ndarray], model: str, members: list[tuple[str, int]]) -> np.ndarray:
    """The rows of `members` (source, prompt) of one model's arrays, stacked: (prompts, seeds)."""
    return np.stack([table[model, source][i] for source, i in members])


def group_rows(model: str, name: str, group: Group, seeds: int, backend: SimilarityBackend, generated: Generated,
               similarities: Similarities, threshold: Threshold, reference: dict[Key, np.ndarray],
               attributes: dict[str, float], cfg: bool) -> list[tuple[str, str, str, float]]:
    """The metrics of one model on one group, in METRICS order."""
    rows = []

    def add(metric: str, value) -> None:
        rows.append((model, name, metric, float(value)))

    add("n_prompts", len(group.members))
    add("n_generations", len(group.members) * seeds)
    reference_values = _pick(reference, model, group.members)
    if np.isfinite(reference_values).any():
        add("memorization_rate", memorization_rate(reference_values, threshold.value))
        if threshold.strict is not None:
            add("memorization_rate_strict", memorization_rate(reference_values, threshold.strict))
        for metric, rate in fixed_rates(reference_values, threshold.fixed).items():
            add(metric, rate)
    copy_values = _pick(similarities.copy, model, group.members)
    if np.isfinite(copy_values).any():
        add("copy_similarity", np.nanmean(copy_values))
    if model != "unedited":
        add("similarity_to_unedited", _pick(similarities.to_unedited, model, group.members).mean())
    if seeds > 1:
        features = torch.stack([similarities.features[model, s][i] for s, i in group.members])
        add("diversity", diversity(backend, features))
    if name == "general" and model in attributes and math.isfinite(attributes[model]):
        add("attribute_accuracy", attributes[model])
    if cfg:
        add("detection_score", _pick(generated.detection_mean, model, group.members).mean())
        add("detection_score_first_step", _pick(generated.detection_first, model, group.members).mean())
    used = {source for source, _ in group.members}
    per_image = generated.per_image_seconds(model, used)
    add("seconds_per_image", per_image)
    if model != "unedited":
        add("seconds_per_image_ratio", per_image / generated.per_image_seconds("unedited", used))
    return rows


def detection_auc_rows(model: str, groups: dict[str, Group], generated: Generated) -> list[tuple[str, str, str, float]]:
    """ROC AUC of the per-prompt detection score: every memorized prompt against each non-memorized group."""
    rows = []
    tables = (("detection_auc", generated.detection_mean), ("detection_auc_first_step", generated.detection_first))
    positives = {metric: _pick(table, model, groups["memorized"].members).mean(axis=1) for metric, table in tables}
    for name in NON_MEMORIZED_GROUPS:
        if name not in groups:
            continue
        for metric, table in tables:
            negatives = _pick(table, model, groups[name].members).mean(axis=1)
            labels = np.r_[np.ones(len(positives[metric])), np.zeros(len(negatives))]
            roc = roc_summary(labels, np.r_[positives[metric], negatives])
            if roc["auc"] is not None:
                rows.append((model, name, metric, roc["auc"]))
    return rows
