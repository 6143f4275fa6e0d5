"""The dtypes an edited pipeline is saved in: the source's own (read from its saved weights) unless asked.

diffusers loads every component in float32 unless told otherwise, so saving what was loaded would silently turn an
fp16 source into an fp32 folder (SDXL: 6.5 GB -> 12 GB). `memprune prune` and `memprune finetune` edit in the dtype
they loaded and cast each component back before saving; zeroed weights stay exactly zero under any cast.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .errors import MemPruneError
from .models import local_model_folder

DTYPE_CHOICES = ("keep", "float32", "float16", "bfloat16")
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _floating_dtype(files: list[Path]) -> torch.dtype | None:
    """The most common floating dtype of the tensors of a component's safetensors files (read from headers only)."""
    from safetensors import safe_open

    counts: Counter[str] = Counter()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                name = handle.get_slice(key).get_dtype()
                if name in _SAFETENSORS_DTYPES:
                    counts[name] += 1
    return _SAFETENSORS_DTYPES[counts.most_common(1)[0][0]] if counts else None


def saved_dtypes(model: str) -> dict[str, torch.dtype]:
    """Component name -> the floating dtype its weights are saved in (components without safetensors are left out)."""
    folder = local_model_folder(model)
    if folder is None:
        return {}
    dtypes = {}
    for component in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(component.glob("*.safetensors"))
        # Variant files (model.fp16.safetensors beside model.safetensors) are not what load_pipeline loads.
        files = [f for f in files if "." not in f.name.removesuffix(".safetensors")] or files
        dtype = _floating_dtype(files)
        if dtype is not None:
            dtypes[component.name] = dtype
    return dtypes


def save_dtypes(pipe, model: str, choice: str = "keep") -> dict[str, torch.dtype]:
    """Component name -> dtype to save it in: the source's (`keep`) or `choice` for every torch component."""
    if choice not in DTYPE_CHOICES:
        raise MemPruneError(f"Unknown --dtype '{choice}': use one of {', '.join(DTYPE_CHOICES)}.")
    modules = {name: module for name, module in getattr(pipe, "components", {}).items()
               if isinstance(module, nn.Module)}
    if choice != "keep":
        return {name: getattr(torch, choice) for name in modules}
    saved = saved_dtypes(model)
    return {name: saved[name] for name in modules if name in saved}


def cast_components(pipe, dtypes: dict[str, torch.dtype]) -> dict[str, str]:
    """Cast each named component of `pipe` in place; return name -> dtype name (what run.json records)."""
    for name, dtype in dtypes.items():
        getattr(pipe, name).to(dtype)
    return {name: str(dtype).removeprefix("torch.") for name, dtype in dtypes.items()}


def describe(dtypes: dict[str, str], choice: str) -> str:
    """One line for a command's summary: the dtypes the folder was saved in and why."""
    if not dtypes:
        return "Saved in the dtypes it was loaded in (the source's saved dtypes could not be read)."
    why = "the source's dtypes, --dtype keep" if choice == "keep" else f"--dtype {choice}"
    return f"Saved in {', '.join(sorted(set(dtypes.values())))} ({why})."
