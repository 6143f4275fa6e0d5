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


def random_control(pipe, counts: dict[str, int], seed: int = 0):
    """A copy of `pipe` whose denoiser has `counts[name]` random non-zero weights of each tensor zeroed."""
    control = copy.deepcopy(pipe)
    params = dict(denoiser(control).named_parameters())
    with torch.no_grad():
        for name, count in counts.items():
            flat = params[name].view(-1)
            chosen = random_weight_indices(flat, count, tensor_generator(seed, name), among="nonzero", name=name)
            flat[chosen.to(flat.device)] = 0
    return control


def random_control_of(pipe, edited_pipe, seed: int = 0):
    """(control pipeline, counts) for an edited pipeline of `pipe`; control is None when the edit zeroes nothing."""
    counts = zeroed_counts(denoiser(pipe), denoiser(edited_pipe))
    return (random_control(pipe, counts, seed) if counts else None), counts
