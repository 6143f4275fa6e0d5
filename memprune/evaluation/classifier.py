"""The attribute classifier that attribute_accuracy reads general-caption generations with (the testbed's)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..models import DEFAULT_MODEL


class AttributeClassifier(Protocol):
    """Predicts the known attributes of generated images: (N, 3, H, W) in [0, 1] -> one {attribute: value} per image.

    Attribute names are matched with the columns of the general prompt file (e.g. shape, colour, background, size).
    """

    def __call__(self, images: torch.Tensor) -> list[dict[str, str]]: ...


def load_testbed_classifier(model_folder: str | Path = DEFAULT_MODEL, log: Callable[[str], None] | None = None
                            ) -> AttributeClassifier | None:
    """The testbed's attribute classifier as an AttributeClassifier, or None when memprune.testbed is not importable.

    Uses `memprune.testbed.attributes.load_classifier(model_folder)` when the testbed provides it (saved weights),
    else trains the classifier with `train_attribute_classifier()` (deterministic: fixed seeds, one torch thread;
    minutes on a CPU). Either object's `predict(uint8 N×H×W×3) -> {attribute: names}` is adapted to the protocol.
    """
    try:
        from ..testbed import attributes
    except ImportError:
        return None
    factory = getattr(attributes, "load_classifier", None)
    if callable(factory):
        classifier = factory(str(model_folder))
    elif callable(getattr(attributes, "train_attribute_classifier", None)):
        (log or (lambda message: None))("Training the testbed attribute classifier (deterministic; minutes on a CPU).")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            classifier = attributes.train_attribute_classifier()
        finally:
            torch.set_num_threads(threads)
    else:
        return None
    if not hasattr(classifier, "predict"):
        return classifier

    def classify(images: torch.Tensor) -> list[dict[str, str]]:
        array = (images.detach().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        predicted = classifier.predict(array)
        return [{name: str(values[i]) for name, values in predicted.items()} for i in range(len(array))]

    return classify
