"""Attribute classifier for the general distribution: reads shape, colour, background and size
off a 32×32 image, to measure whether generations follow their caption.

A tiny CNN (translation invariance matters: the caption does not fix the shape's position)
trained on freshly generated procedural images, from a fixed seed with one CPU thread, so the
same classifier comes out every time. Optionally the training images go through the testbed's
VAE first, so the classifier sees the slight blur every generation has.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import COLOURS, SHAPES, SIZES, all_shape_specs, render_shape

ATTRIBUTES = ("shape", "colour", "background", "size")
CLASSES = {"shape": list(SHAPES), "colour": list(COLOURS), "background": list(COLOURS), "size": list(SIZES)}


@dataclass
class AttributeClassifierConfig:
    seed: int = 1234  # differs from the testbed seed: fresh images, not the training set
    images_per_spec: int = 8
    epochs: int = 10
    batch_size: int = 128
    lr: float = 3e-3


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        )
        # Global max pooling finds the shape wherever it is; global mean pooling sees the background.
        self.heads = nn.ModuleDict({a: nn.Linear(128, len(CLASSES[a])) for a in ATTRIBUTES})

    def forward(self, x):
        h = self.body(x)
        h = torch.cat([h.amax((2, 3)), h.mean((2, 3))], 1)
        return {a: head(h) for a, head in self.heads.items()}


class AttributeClassifier:
    def __init__(self, net: _Net):
        self.net = net.eval()

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 N×32×32×3 → attribute name → array of N class names."""
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        logits: dict[str, list[torch.Tensor]] = {a: [] for a in ATTRIBUTES}
        for i in range(0, len(x), 512):
            out = self.net(x[i : i + 512])
            for a in ATTRIBUTES:
                logits[a].append(out[a].argmax(1))
        return {a: np.array(CLASSES[a])[torch.cat(v).numpy()] for a, v in logits.items()}


def make_labelled_images(cfg: AttributeClassifierConfig) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Fresh renders of every attribute combination (held-out ones included: they are the test)."""
    rng = np.random.default_rng(cfg.seed)
    specs = [s for s in all_shape_specs() for _ in range(cfg.images_per_spec)]
    images = np.stack([np.asarray(render_shape(s, rng)) for s in specs])
    labels = {a: np.array([CLASSES[a].index(getattr(s, a)) for s in specs]) for a in ATTRIBUTES}
    return images, labels


def train_attribute_classifier(cfg: AttributeClassifierConfig | None = None, vae=None,
                               cache: str | None = None) -> AttributeClassifier:
    """Deterministic: fixed seeds, and the caller should run with one torch thread.

    `cache`: a file to load the trained weights from / save them to (training takes minutes)."""
    import dataclasses
    import os

    cfg = cfg or AttributeClassifierConfig()
    key = {"config": dataclasses.asdict(cfg), "vae": vae is not None}
    if cache and os.path.exists(cache):
        saved = torch.load(cache, weights_only=False)
        if saved["key"] == key:
            net = _Net()
            net.load_state_dict(saved["state"])
            return AttributeClassifier(net)
    images, labels = make_labelled_images(cfg)
    if vae is not None:
        from .imagesim import vae_reconstruct

        images = np.concatenate(
            [images, np.concatenate([vae_reconstruct(vae, images[i : i + 512]) for i in range(0, len(images), 512)])]
        )
        labels = {a: np.concatenate([v, v]) for a, v in labels.items()}
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = {a: torch.from_numpy(v) for a, v in labels.items()}
    torch.manual_seed(cfg.seed)
    net = _Net()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    n_batches = (len(x) + cfg.batch_size - 1) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * n_batches)
    net.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            out = net(x[idx])
            loss = x.new_zeros(())  # summed in the order of Python's sum(): the same numbers as before
            for a in ATTRIBUTES:
                loss = loss + F.cross_entropy(out[a], y[a][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    if cache:
        torch.save({"key": key, "state": net.state_dict()}, cache)
    return AttributeClassifier(net)


def accuracy(clf: AttributeClassifier, images: np.ndarray, labels: dict[str, np.ndarray]) -> dict[str, float]:
    pred = clf.predict(images)
    return {a: float((pred[a] == np.array(CLASSES[a])[labels[a]]).mean()) for a in ATTRIBUTES}


CLASSIFIER_FILE = "attribute_classifier.safetensors"


def save_classifier(clf: AttributeClassifier, path: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in clf.net.state_dict().items()}, path)


def load_classifier(model_folder: str | None = None) -> AttributeClassifier:
    """The classifier shipped in a testbed folder (`attribute_classifier.safetensors`), else a
    freshly trained one (deterministic; minutes on one CPU thread)."""
    import os

    from safetensors.torch import load_file

    path = os.path.join(model_folder, CLASSIFIER_FILE) if model_folder else None
    if path and os.path.exists(path):
        net = _Net()
        net.load_state_dict(load_file(path))
        return AttributeClassifier(net)
    return train_attribute_classifier()
