"""Output folders: refuse to overwrite silently, write atomically, and describe every run in run.json."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from .errors import MemPruneError

Log = Callable[[str], None]


def notice(message: str) -> None:
    """Default for `log`: one line on stderr, where the CLI's other notices go."""
    print(message, file=sys.stderr)


def check_output_dir(out: str | Path, overwrite: bool, protected: Iterable[str | Path] = (),
                     log: Log | None = notice) -> Path:
    """Refuse an existing output (unless overwrite) and one that is, contains or lies in a `protected` source.
    A run that may go ahead first removes the temporary folders that killed runs with the same `out` left beside
    it (`remove_stale_staging`), saying so through `log`."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise MemPruneError(f"Output folder '{out}' already exists: choose another --out or pass --overwrite.")
    if out.exists() and not out.is_dir():
        raise MemPruneError(f"Output '{out}' exists and is a file, not a folder.")
    resolved = out.resolve()
    for path in protected:
        path = Path(path).resolve()
        if resolved == path or path in resolved.parents or resolved in path.parents:
            raise MemPruneError(
                f"Output folder '{out}' overlaps the source '{path}': memprune never writes into a source.")
    remove_stale_staging(out, log)
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False, protected: Iterable[str | Path] = (),
                      log: Log | None = notice) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `out` in one rename, on failure it is removed.

    `protected` are paths (e.g. the source model) that `out` must not be or contain. What is renamed into place
    has the permissions of an ordinary save under the user's umask, not the temporary folder's 0700.
    """
    out = check_output_dir(out, overwrite, protected, log).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(out, "tmp"), dir=out.parent))
    try:
        yield staging
        apply_default_permissions(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=_staging_prefix(out, "old"), dir=out.parent))
        out.rename(trash / out.name)
        staging.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        staging.rename(out)


# --------------------------------------------------------------------------- temporary folders of killed runs
# A staging folder is named `.OUT.tmp-PID-XXXX` (`.OUT.old-PID-XXXX` while a replaced output is being removed),
# PID being the process that writes it; detect stages in `.OUT.run-*` and the testbed in `.OUT.tmp-PID`. Folders
# named before the PID was part of the name carry none and count as stale.
_STAGING_KINDS = ("tmp", "old", "run")
_MAX_PID = 2**22  # Linux's pid_max ceiling: a larger number is a random suffix, not a process


def _staging_prefix(out: Path, kind: str) -> str:
    return f".{out.name}.{kind}-{os.getpid()}-"


def staging_dir(out: str | Path, kind: str = "tmp") -> Path:
    """A new temporary sibling folder of `out`, named with this process's PID (stale_staging knows it is live)."""
    out = Path(out).absolute()
    return Path(tempfile.mkdtemp(prefix=_staging_prefix(out, kind), dir=out.parent))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if pid <= 0 or pid > _MAX_PID:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user holds that PID
        return True
    return True


def stale_staging(out: str | Path) -> list[Path]:
    """Temporary sibling folders of `out` whose writing process no longer runs: left by killed runs."""
    out = Path(out).absolute()
    if not out.parent.is_dir():
        return []
    kinds = "|".join(_STAGING_KINDS)
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:{kinds})-(?:(\d+)(?:[-.]|$))?")
    stale = []
    for sibling in sorted(out.parent.iterdir()):
        match = pattern.match(sibling.name)
        if match and sibling.is_dir() and not sibling.is_symlink():
            pid = match.group(1)
            if pid is None or not _pid_alive(int(pid)):
                stale.append(sibling)
    return stale


def remove_stale_staging(out: str | Path, log: Log | None = notice) -> list[Path]:
    """Remove the temporary folders that killed runs with this `out` left; one line through `log` if any."""
    stale = stale_staging(out)
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    if stale and log is not None:
        names = ", ".join(folder.name for folder in stale)
        plural = "s" if len(stale) > 1 else ""
        log(f"Removed {len(stale)} temporary folder{plural} that an interrupted run with --out {out} left: {names}.")
    return stale


# --------------------------------------------------------------------------- permissions of what is written
def current_umask() -> int:
    """The process's umask (read by setting and restoring it: the only portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_default_permissions(path: str | Path, umask: int | None = None) -> None:
    """Give `path` (a file, or a folder and everything in it) the modes a fresh save under the user's umask
    gives: 0o777 & ~umask for folders, 0o666 & ~umask for files. Temporary folders and files are created 0700
    and 0600, and a rename into place would otherwise carry that into the output."""
    umask = current_umask() if umask is None else umask
    folder_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask
    path = Path(path)
    if not path.is_dir():
        path.chmod(file_mode)
        return
    path.chmod(folder_mode)
    for root, folders, files in os.walk(path):
        for name in folders + files:
            entry = os.path.join(root, name)
            if not os.path.islink(entry):
                os.chmod(entry, folder_mode if name in folders else file_mode)


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
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # an instance, not a dataclass itself
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

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)


def write_run_json(folder: str | Path, settings, inputs: Mapping[str, str | Path | None] | None = None,
                   timings: dict | None = None, **extra) -> Path:
    """run.json: the exact command, all settings, versions, input hashes (sha256) and timings."""
    from .masks import file_sha256

    hashes: dict[str, dict[str, str]] = {}
    for name, given in (inputs or {}).items():
        path = Path(given) if given else None
        hashes[name] = {"path": str(path)}
        if path is not None and path.is_file():
            hashes[name]["sha256"] = file_sha256(path)
    record = {
        "command": sys.argv,
        "settings": _jsonable(settings),
        "versions": versions(),
        "inputs": hashes,
        "timings_s": timings or {},
        **_jsonable(extra),
    }
    run_json = Path(folder) / "run.json"
    run_json.write_text(json.dumps(record, indent=1))
    return run_json
