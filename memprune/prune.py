"""Apply masks to a pipeline (zero the selected weights of each masked Linear: FeedForward output Linears, and
cross-attention value Linears for NeMo's neuron masks) and save it."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import MemPruneError
from .masks import MASKS_FILE, Masks, file_sha256
from .models import denoiser, prunable_layer_shapes, prunable_linears

PRUNE_INFO = "memprune.json"


@dataclass
class PruneResult:
    """What an edit replaced, so it can be undone and verified (as ROME returns its edit)."""

    timesteps: int
    zeroed: dict[str, int] = field(default_factory=dict)  # masked weights per layer
    indices: dict[str, torch.Tensor] = field(default_factory=dict)
    originals: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def total_zeroed(self) -> int:
        return sum(self.zeroed.values())


def apply_masks(pipe, masks: Masks, timesteps: int = 10) -> PruneResult:
    """Zero the union over steps 0..timesteps-1 of the masks, in place on `pipe`; biases are untouched."""
    net = denoiser(pipe)
    masks.check_compatible(prunable_layer_shapes(net))
    if timesteps < 1:
        raise MemPruneError(f"--timesteps must be at least 1, got {timesteps}.")
    if timesteps > len(masks.steps):
        raise MemPruneError(
            f"--timesteps {timesteps} is larger than the {len(masks.steps)} steps recorded in the masks: "
            f"use at most {len(masks.steps)}."
        )
    linears = prunable_linears(net)
    result = PruneResult(timesteps=timesteps)
    with torch.no_grad():
        for layer, indices in masks.union_indices(timesteps).items():
            flat = linears[layer].weight.view(-1)
            indices = indices.to(flat.device)
            result.indices[layer] = indices.cpu()
            result.originals[layer] = flat[indices].detach().cpu().clone()
            flat[indices] = 0
            result.zeroed[layer] = int(indices.numel())
    return result


def undo(pipe, result: PruneResult) -> None:
    """Restore the weights an `apply_masks` call replaced."""
    linears = prunable_linears(denoiser(pipe))
    with torch.no_grad():
        for layer, indices in result.indices.items():
            flat = linears[layer].weight.view(-1)
            flat[indices.to(flat.device)] = result.originals[layer].to(flat)


def prune_info(source: str, masks_folder: str | Path, result: PruneResult, masks: Masks) -> dict:
    shapes = masks.shapes
    return {
        "source": str(source),
        "masks": str(Path(masks_folder).resolve()),
        "masks_sha256": file_sha256(Path(masks_folder) / MASKS_FILE),
        "timesteps": result.timesteps,
        "zeroed_weights": result.zeroed,
        "zeroed_share": {layer: n / (shapes[layer][0] * shapes[layer][1]) for layer, n in result.zeroed.items()},
        "total_zeroed": result.total_zeroed,
        "selection": masks.meta.get("selection", {}),
        "method": masks.meta.get("selection", {}).get("method", "wanda"),
    }


def save_pruned(pipe, folder: str | Path, info: dict) -> None:
    """A complete diffusers pipeline folder (safetensors) that stock diffusers loads, plus memprune.json (the
    `memprune prune` command adds the README.md model card, memprune.model_card)."""
    pipe.save_pretrained(str(folder), safe_serialization=True)
    (Path(folder) / PRUNE_INFO).write_text(json.dumps(info, indent=1))


def verify_pruned(folder: str | Path, masks: Masks, timesteps: int, dtype: torch.dtype | None = None) -> int:
    """Reload the saved pipeline with stock diffusers (in `dtype`, default diffusers' float32) and check every masked
    weight is zero; return the count."""
    from diffusers import DiffusionPipeline

    kwargs = {} if dtype is None else {"dtype": dtype}
    pipe = DiffusionPipeline.from_pretrained(str(folder), use_safetensors=True, **kwargs)
    linears = prunable_linears(denoiser(pipe))
    checked = 0
    for layer, indices in masks.union_indices(timesteps).items():
        values = linears[layer].weight.view(-1)[indices]
        if torch.count_nonzero(values):
            raise MemPruneError(f"Verification failed: {layer} still has non-zero masked weights after reload.")
        checked += indices.numel()
    return checked
