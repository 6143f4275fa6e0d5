"""Load edited pipelines that share with the unedited one every component the edit left byte-identical.

An edited folder of `memprune prune` or `memprune finetune` changes only the denoiser; loading its text encoders,
tokenizers and VAE again would hold a second copy of each (SDXL: ~2 GB more per edited model). A component is
shared when its files equal the base's: weight files by sha256, JSON files by content without private keys and
loading context (`_diffusers_version`, `_name_or_path`, `transformers_version`, `is_local`, `local_files_only`:
they differ between library versions and loads, not between models).
The scheduler is never shared (it keeps per-call state); it is small.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..masks import file_sha256
from ..models import denoiser, load_pipeline, local_model_folder

NEVER_SHARED = ("scheduler", "unet", "transformer")
CONTEXT_KEYS = ("transformers_version", "name_or_path", "is_local", "local_files_only")


def _file_print(path: Path) -> str:
    if path.suffix == ".json":
        try:
            content = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return file_sha256(path)
        if isinstance(content, dict):
            content = {k: v for k, v in content.items() if not k.startswith("_") and k not in CONTEXT_KEYS}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    return file_sha256(path)


def component_print(folder: Path) -> str | None:
    """A fingerprint of one component folder (None when it does not exist)."""
    if not folder.is_dir():
        return None
    listing = [f"{p.relative_to(folder)}:{_file_print(p)}" for p in sorted(folder.rglob("*")) if p.is_file()]
    return hashlib.sha256("\n".join(listing).encode()).hexdigest()


def identical_components(base: str, edited: str, names: list[str]) -> list[str]:
    """The components among `names` whose files are the same in the two pipelines (none when one is not local)."""
    base_folder, edited_folder = local_model_folder(base), local_model_folder(edited)
    if base_folder is None or edited_folder is None:
        return []
    same = []
    for name in names:
        if name in NEVER_SHARED:
            continue
        base_print = component_print(base_folder / name)
        if base_print is not None and base_print == component_print(edited_folder / name):
            same.append(name)
    return same


def load_sharing(base_pipe, base_source: str, folder: str, device: torch.device, dtype=None):
    """The pipeline of `folder`, its unchanged components taken from `base_pipe` (same objects, not loaded again)."""
    components = getattr(base_pipe, "components", {})
    shared = identical_components(base_source, folder, [n for n, m in components.items() if m is not None])
    given = {name: components[name] for name in shared if components[name] is not denoiser(base_pipe)}
    return load_pipeline(folder, device, dtype, components=given)
