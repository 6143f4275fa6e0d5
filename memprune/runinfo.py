"""Output folders: refuse to overwrite silently, write atomically, and describe every run in run.json."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .errors import MemPruneError


def check_output_dir(out: str | Path, overwrite: bool, protected=()) -> Path:
    """Refuse an existing output (unless overwrite) and one that is, contains or lies in a `protected` source."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise MemPruneError(f"Output folder '{out}' already exists: choose another --out or pass --overwrite.")
    if out.exists() and not out.is_dir():
        raise MemPruneError(f"Output '{out}' exists and is a file, not a folder.")
    resolved = out.resolve()
    for path in protected:
        path = Path(path).resolve()
        if resolved == path or path in resolved.parents or resolved in path.parents:
            raise MemPruneError(f"Output folder '{out}' overlaps the source '{path}': memprune never writes into a source.")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False, protected: list[str | Path] = ()):
    """Yield a temporary sibling folder; on success it replaces `out` in one rename, on failure it is removed.

    `protected` are paths (e.g. the source model) that `out` must not be or contain.
    """
    out = check_output_dir(out, overwrite, protected).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(trash / out.name)
        staging.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        staging.rename(out)


def versions() -> dict:
    import diffusers
    import torch
    import transformers

    from . import __version__

    return {
        "memprune": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class Timer:
    """Collects named wall-clock timings for run.json."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)


def write_run_json(folder: str | Path, settings, inputs: dict[str, str] | None = None, timings: dict | None = None, **extra) -> Path:
    """run.json: the exact command, all settings, versions, input hashes (sha256) and timings."""
    from .masks import file_sha256

    hashes = {}
    for name, path in (inputs or {}).items():
        path = Path(path) if path else None
        hashes[name] = {"path": str(path), "sha256": file_sha256(path)} if path and path.is_file() else {"path": str(path)}
    record = {
        "command": sys.argv,
        "settings": _jsonable(settings),
        "versions": versions(),
        "inputs": hashes,
        "timings_s": timings or {},
        **_jsonable(extra),
    }
    path = Path(folder) / "run.json"
    path.write_text(json.dumps(record, indent=1))
    return path
