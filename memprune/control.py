"""Random controls of the same size: "the located subspace, not just any weights".

An edit that zeroes weights is only evidence when a random edit of the same size does not do the same. For any
edited pipeline (a Wanda or NeMo prune, a UniForget gate, a hand edit) `zeroed_counts` counts, per denoiser tensor,
the weights that are zero in the edit but not in the base model; `random_control` zeroes the same number of
randomly chosen non-zero weights of the same tensors of a copy of the base model (seeded, so it can be rebuilt;
the draw is masks.random_weight_indices among the non-zero entries).
It needs no masks file, so it works for every weight edit alike. Fine-tunes, which zero nothing, get no control
here (their control is a step-matched fine-tune without the method's objective).
"""
from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

from .errors import MemPruneError
from .masks import random_weight_indices
from .models import denoiser


def zeroed_counts(base: torch.nn.Module, edited: torch.nn.Module) -> dict[str, int]:
    """Per parameter name, how many entries are zero in `edited` and non-zero in `base` (only tensors with any)."""
    base_params = dict(base.named_parameters())
    counts = {}
    for name, edited_param in edited.named_parameters():
        base_param = base_params.get(name)
        if base_param is None or base_param.shape != edited_param.shape:
            raise MemPruneError(f"The edited model's parameter '{name}' has no counterpart of the same shape in the "
                                "base model: it is not an edit of this base.")
        count = int(((edited_param.detach() == 0) & (base_param.detach().to(edited_param.device) != 0)).sum())
        if count:
            counts[name] = count
    return counts


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A per-tensor generator: the same tensor gets the same random choice whatever else is in the model."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def copy_denoiser_only(pipe):
    """A copy of `pipe` with its own denoiser that shares every other torch component (text encoders, VAE) and the
    tokenizers with `pipe`: an edit of the denoiser leaves them as they are, and a whole copy of an SDXL pipeline
    would not fit beside the others. The scheduler (it keeps per-call state) and the configuration are copied."""
    net = denoiser(pipe)
    shared = [part for name, part in getattr(pipe, "components", {}).items()
              if part is not None and part is not net and name != "scheduler"]
    return copy.deepcopy(pipe, memo={id(part): part for part in shared})


def random_control_indices(pipe, counts: dict[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Per denoiser tensor of `pipe`, the flat indices of `counts[name]` random non-zero weights (seeded per tensor)."""
    params = dict(denoiser(pipe).named_parameters())
    return {name: random_weight_indices(params[name].view(-1), count, tensor_generator(seed, name), among="nonzero",
                                        name=name)
            for name, count in counts.items()}


def random_control(pipe, counts: dict[str, int], seed: int = 0):
    """A copy of `pipe` whose denoiser has `counts[name]` random non-zero weights of each tensor zeroed (only the
    denoiser is copied: see copy_denoiser_only)."""
    indices = random_control_indices(pipe, counts, seed)
    control = copy_denoiser_only(pipe)
    params = dict(denoiser(control).named_parameters())
    with torch.no_grad():
        for name, chosen in indices.items():
            flat = params[name].view(-1)
            flat[chosen.to(flat.device)] = 0
    return control


def random_control_of(pipe, edited_pipe, seed: int = 0):
    """(control pipeline, counts) for an edited pipeline of `pipe`; control is None when the edit zeroes nothing."""
    counts = zeroed_counts(denoiser(pipe), denoiser(edited_pipe))
    return (random_control(pipe, counts, seed) if counts else None), counts


class ZeroedWeights:
    """The random control as an edit of `pipe` itself, applied only while it generates: `with control.applied() as
    pipe:` zeroes the chosen weights of its denoiser and restores them exactly on leaving. The same weights as
    random_control's copy, so the same images, without a second denoiser in memory (3.4 GB for SD 1.5 in fp32)."""

    def __init__(self, pipe, indices: dict[str, torch.Tensor]):
        self.pipe, self.indices = pipe, indices

    @contextmanager
    def applied(self) -> Iterator[object]:
        params = dict(denoiser(self.pipe).named_parameters())
        originals = {}
        try:
            with torch.no_grad():
                for name, chosen in self.indices.items():
                    flat = params[name].view(-1)
                    chosen = chosen.to(flat.device)
                    originals[name] = (chosen, flat[chosen].clone())
                    flat[chosen] = 0
            yield self.pipe
        finally:
            with torch.no_grad():
                for name, (chosen, values) in originals.items():
                    params[name].view(-1)[chosen] = values


def random_control_edit_of(pipe, edited_pipe, seed: int = 0) -> tuple[ZeroedWeights | None, dict[str, int]]:
    """As random_control_of, the control as ZeroedWeights of `pipe` (None when the edit zeroes nothing)."""
    counts = zeroed_counts(denoiser(pipe), denoiser(edited_pipe))
    return (ZeroedWeights(pipe, random_control_indices(pipe, counts, seed)) if counts else None), counts


def applied(model) -> AbstractContextManager:
    """`with applied(model) as pipe:` a pipeline as it is, or a ZeroedWeights control applied to its pipeline for the
    time of the block (everything that generates with evaluate's model columns goes through this)."""
    return model.applied() if isinstance(model, ZeroedWeights) else nullcontext(model)
