"""Fixed copy thresholds beside the calibrated one: the field reports the memorization rate at SSCD 0.7 (Wen et al.,
DoRI) and sometimes 0.5, whatever the non-memorized generations look like.

A fixed threshold t gives the metric ``memorization_rate@t`` (``memorization_rate_attacked@t`` in the attack): the
share of generations whose copy similarity is strictly above t, over the same generations and the same copy
reference as ``memorization_rate`` (the training image, or the unedited generation of the same prompt and seed when
training images are unknown). A threshold outside the similarity backend's range would count nothing or everything,
so it is refused.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..errors import MemPruneError
from .metrics import memorization_rate

# The range of each backend's similarity (memprune.similarity): SSIM and the cosine of SSCD embeddings lie in
# [-1, 1]; 1 - normalised L2 distance of [0, 1] pixels lies in [0, 1].
BACKEND_RANGES = {"ssim": (-1.0, 1.0), "l2": (0.0, 1.0), "sscd": (-1.0, 1.0)}


def fixed_rate_metric(threshold: float, base: str = "memorization_rate") -> str:
    """The metric name of a rate at a fixed threshold, e.g. memorization_rate@0.7."""
    return f"{base}@{threshold:g}"


def check_fixed_thresholds(thresholds: Iterable[float], backend: str) -> tuple[float, ...]:
    """The thresholds, sorted and without repeats; refuse any outside the backend's similarity range."""
    low, high = BACKEND_RANGES[backend]
    values = tuple(sorted({float(t) for t in thresholds}))
    for value in values:
        if not np.isfinite(value) or not low <= value <= high:
            raise MemPruneError(f"--fixed-threshold {value:g} is outside the {backend} similarity range "
                                f"[{low:g}, {high:g}].")
    return values


def backend_name(similarity: str, sscd: str | None) -> str:
    """The backend make_backend builds from these settings: sscd when a model file is given."""
    return "sscd" if sscd is not None else similarity


def fixed_rates(values, thresholds: Iterable[float], base: str = "memorization_rate") -> dict[str, float]:
    """{memorization_rate@t: rate} for each fixed threshold (NaN entries of `values` are left out)."""
    return {fixed_rate_metric(t, base): memorization_rate(values, t) for t in thresholds}


def sscd_gen_note(memorized) -> str | None:
    """The one line that says copies are counted against the unedited generation (the memorized PromptList has no
    training image), None when it has training images."""
    if memorized.images and any(memorized.images):
        return None
    return (f"'{memorized.source}' has no image column: copies are counted against the unedited model's generation "
            "of the same prompt and seed (SSCD_Gen, similarity_to_unedited), not the training image (SSCD_Orig).")
