"""Masks: which weights of each FeedForward output Linear were selected, per (layer, step).

A mask is stored sparsely as the sorted flat indices of its selected entries in the weight W (C x H),
so memory and file size scale with what is selected, not with the model (SDXL x 50 steps would be GBs
of booleans). Selections make each (layer, step) mask sparse as soon as it is made (`sparse_indices`), so no
dense mask of every step is ever held. Indices are int32 when the weight has fewer than 2**31 entries (every
diffusers model today: half the memory and file size of int64); files written with int64 indices load to the
same selections. IoU, per-step unions and save/load work on these index sets.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import combinations, product
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from .errors import MemPruneError

Key = tuple[str, int]
MASKS_FILE = "masks.safetensors"
MASKS_META = "masks.json"


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """|A ∩ B| / |A ∪ B| of two sorted index sets (or two boolean masks); NaN when both are empty."""
    if a.dtype == torch.bool:
        a, b = a.flatten().nonzero().squeeze(1), b.flatten().nonzero().squeeze(1)
    intersection = np.intersect1d(a.cpu().numpy(), b.cpu().numpy(), assume_unique=True).size
    union = a.numel() + b.numel() - intersection
    return intersection / union if union else float("nan")


def index_dtype(entries: int) -> torch.dtype:
    """int32 for the flat indices of a weight of `entries` entries where they fit, else int64."""
    return torch.int32 if entries <= torch.iinfo(torch.int32).max else torch.int64


def sparse_indices(mask: torch.Tensor) -> torch.Tensor:
    """The sorted flat indices (on the CPU, int32 where they fit) of one dense boolean mask."""
    return mask.flatten().nonzero().squeeze(1).to("cpu", index_dtype(mask.numel()))


@dataclass
class Masks:
    indices: dict[Key, torch.Tensor]  # sorted flat indices into the (C, H) weight, int32 where they fit
    shapes: dict[str, tuple[int, int]]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # One index dtype whatever made the masks (a selection, an int64 file of older versions, a random draw).
        converted: dict[int, torch.Tensor] = {}  # a set shared by several steps stays shared
        for key, idx in self.indices.items():
            shape = self.shapes.get(key[0])
            if shape is not None:
                if id(idx) not in converted:
                    converted[id(idx)] = idx.to(index_dtype(int(np.prod(shape))))
                self.indices[key] = converted[id(idx)]

    @classmethod
    def from_dense(cls, dense: dict[Key, torch.Tensor], meta: dict | None = None) -> Masks:
        shapes = {layer: (mask.shape[0], mask.shape[1]) for (layer, _), mask in dense.items()}
        indices = {key: sparse_indices(mask) for key, mask in dense.items()}
        return cls(indices=indices, shapes=shapes, meta=dict(meta or {}))

    @property
    def layers(self) -> list[str]:
        return list(self.shapes)

    @property
    def steps(self) -> list[int]:
        return sorted({step for _, step in self.indices})

    def dense(self, layer: str, step: int) -> torch.Tensor:
        return self._to_dense(layer, self.indices[(layer, step)])

    def _to_dense(self, layer: str, indices: torch.Tensor) -> torch.Tensor:
        rows, columns = self.shapes[layer]
        mask = torch.zeros(rows * columns, dtype=torch.bool)
        mask[indices] = True
        return mask.view(rows, columns)

    def union_indices(self, steps: int | Iterable[int]) -> dict[str, torch.Tensor]:
        """Per layer, the indices selected at any of `steps` (an int τ means steps 0..τ-1)."""
        wanted = range(steps) if isinstance(steps, int) else list(steps)
        missing = [s for s in wanted if s not in self.steps]
        if missing:
            raise MemPruneError(
                f"The masks hold steps {self.steps[0]}..{self.steps[-1]} but step {missing[0]} was asked for: "
                f"use --timesteps {len(self.steps)} or fewer."
            )
        return {
            layer: torch.unique(torch.cat([self.indices[(layer, s)] for s in wanted if (layer, s) in self.indices]))
            for layer in self.layers
        }

    def union(self, steps: int | Iterable[int]) -> dict[str, torch.Tensor]:
        """Per layer, the boolean mask of weights selected at any of `steps`."""
        return {layer: self._to_dense(layer, idx) for layer, idx in self.union_indices(steps).items()}

    def count(self) -> dict[Key, int]:
        return {key: int(idx.numel()) for key, idx in self.indices.items()}

    def iou(self, other: Masks) -> pd.DataFrame:
        """IoU per (layer, step) present in both."""
        rows = [
            {"layer": layer, "step": step, "iou": iou(idx, other.indices[(layer, step)])}
            for (layer, step), idx in self.indices.items()
            if (layer, step) in other.indices
        ]
        return pd.DataFrame(rows, columns=["layer", "step", "iou"])

    def check_compatible(self, shapes: dict[str, list[int]]) -> None:
        """Refuse masks made for another model: every layer must exist with the same weight shape."""
        for layer, shape in self.shapes.items():
            if layer not in shapes:
                raise MemPruneError(
                    f"The masks were made for another model: layer '{layer}' does not exist in this one "
                    f"(masks from {self.meta.get('model', {}).get('source', 'an unknown model')})."
                )
            if tuple(shapes[layer]) != tuple(shape):
                raise MemPruneError(
                    f"The masks were made for another model: layer '{layer}' has weight shape {list(shape)} "
                    f"in the masks but {list(shapes[layer])} in this model."
                )

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors, seen = {}, set()
        for (layer, step), idx in self.indices.items():
            idx = idx.contiguous()
            if idx.data_ptr() in seen and idx.numel():  # one set shared by several steps: safetensors wants copies
                idx = idx.clone()
            seen.add(idx.data_ptr())
            tensors[f"{layer}|{step}"] = idx
        save_file(tensors, str(folder / MASKS_FILE))
        meta = {
            **self.meta,
            "layers": {layer: list(shape) for layer, shape in self.shapes.items()},
            "steps": self.steps,
            "selected": {f"{layer}|{step}": n for (layer, step), n in self.count().items()},
        }
        (folder / MASKS_META).write_text(json.dumps(meta, indent=1))
        return folder / MASKS_FILE

    @classmethod
    def load(cls, folder: str | Path) -> Masks:
        given = Path(folder)
        folder = given.parent if given.is_file() else given  # a file of the folder (masks.safetensors) names it too
        if not (folder / MASKS_FILE).is_file() or not (folder / MASKS_META).is_file():
            where = f"'{given}' is a file, not a folder of masks, and '{folder}'" if given.is_file() else f"'{folder}'"
            raise MemPruneError(f"{where} holds no {MASKS_FILE} + {MASKS_META}: give the output folder of "
                                "`memprune locate`.")
        try:
            tensors = load_file(str(folder / MASKS_FILE))
            meta = json.loads((folder / MASKS_META).read_text())
            shapes = {layer: tuple(shape) for layer, shape in meta.pop("layers").items()}
        except Exception as exc:
            raise MemPruneError(f"Masks in '{folder}' are unreadable or malformed: {exc}.") from exc
        meta.pop("steps", None)
        meta.pop("selected", None)
        indices = {}
        for key, idx in tensors.items():
            layer, step = key.rsplit("|", 1)
            indices[(layer, int(step))] = idx
        return cls(indices=indices, shapes=shapes, meta=meta)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


OVERLAP_COLUMNS = ["group_a", "group_b", "subset_a", "subset_b", "layer", "step", "iou"]


def subset_overlap(groups: dict[str, list[Masks]]) -> pd.DataFrame:
    """Tidy pairwise IoU: pairs i<j inside each group (no diagonal) and all pairs across groups."""
    frames = []
    names = list(groups)
    pairs = [(g, g, i, j) for g in names for i, j in combinations(range(len(groups[g])), 2)]
    pairs += [
        (a, b, i, j)
        for a, b in combinations(names, 2)
        for i, j in product(range(len(groups[a])), range(len(groups[b])))
    ]
    for group_a, group_b, i, j in pairs:
        frame = groups[group_a][i].iou(groups[group_b][j])
        frame.insert(0, "subset_b", j)
        frame.insert(0, "subset_a", i)
        frame.insert(0, "group_b", group_b)
        frame.insert(0, "group_a", group_a)
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=OVERLAP_COLUMNS)
    return pd.concat(frames, ignore_index=True)[OVERLAP_COLUMNS]


def summarize_overlap(overlap: pd.DataFrame) -> pd.DataFrame:
    """Mean IoU per comparison (group pair): overall, and the range of the per-layer means."""
    comparison = overlap["group_a"] + " vs " + overlap["group_b"]
    by_layer = overlap.groupby([comparison, "layer"])["iou"].mean().groupby(level=0)
    return pd.DataFrame(
        {
            "mean_iou": overlap.groupby(comparison)["iou"].mean(),
            "min_layer_iou": by_layer.min(),
            "max_layer_iou": by_layer.max(),
        }
    ).rename_axis("comparison")


def random_weight_indices(weight: torch.Tensor | tuple[int, ...], count: int, generator: torch.Generator,
                          among: Literal["all", "nonzero"] = "all", name: str = "weight") -> torch.Tensor:
    """`count` sorted flat indices of one weight tensor, drawn uniformly without replacement by `generator`.

    The one random draw behind both controls; `among` says which entries may be drawn:
    - "all": any entry, zero or not (`weight` may be just its shape): a random mask of the size of a located one;
    - "nonzero": only entries that are not zero yet, so zeroing them changes exactly `count` weights (the random
      control of any weight edit, memprune.control).
    """
    if among == "all":
        shape = tuple(weight.shape) if torch.is_tensor(weight) else tuple(weight)
        return torch.randperm(int(np.prod(shape)), generator=generator)[:count].sort().values
    if among != "nonzero" or not torch.is_tensor(weight):
        raise MemPruneError(f"random_weight_indices draws among 'all' entries or the 'nonzero' entries of a weight "
                            f"tensor, got among={among!r}.")
    nonzero = weight.detach().flatten().nonzero().squeeze(1).cpu()
    if count > nonzero.numel():
        raise MemPruneError(f"Cannot zero {count} random weights of '{name}': it has only {nonzero.numel()} non-zero.")
    return nonzero[torch.randperm(nonzero.numel(), generator=generator)[:count]].sort().values


def random_masks_like(masks: Masks, timesteps: int, seed: int = 0) -> Masks:
    """The control of the pruning claim: per layer, as many uniformly random weights (any entry of the weight) as
    the union of `masks` over steps 0..timesteps-1 selects, repeated at each of those steps (so its union is that
    set). One generator seeded with `seed` draws the layers in order."""
    generator = torch.Generator().manual_seed(seed)
    indices = {}
    for layer, selected in masks.union_indices(timesteps).items():
        chosen = random_weight_indices(tuple(masks.shapes[layer]), selected.numel(), generator, among="all")
        indices.update({(layer, step): chosen for step in range(timesteps)})
    meta = {**masks.meta, "selection": {"method": "random", "seed": seed, "matched_to": masks.meta.get("selection")}}
    return Masks(indices=indices, shapes=dict(masks.shapes), meta=meta)
