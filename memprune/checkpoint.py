"""Partial statistics of a running locate, so a killed run resumes where it stopped (`--resume`).

They live beside the output, in `OUT.partial/`: `settings.json` (every setting the statistics depend on) and, per
prompt set and rank, one safetensors file holding the float64 running totals of the calls done so far and their
count. Each file is written to a temporary name and renamed, so a kill leaves the previous version intact. Resuming
loads the totals and runs only the remaining calls; merges happen in the same order as in an uninterrupted run, so
the result is the same. The folder is removed once the output is written.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from .errors import MemPruneError
from .readback import read_json_object
from .runinfo import Log, notice
from .stats import NeuronStats

SETTINGS_FILE = "settings.json"


def partial_folder(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


def prompts_key(prompts: list[str]) -> str:
    """A stable name for a prompt set: the same prompts give the same statistics."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


def first_difference(saved: dict, now: dict) -> str | None:
    for name in dict.fromkeys([*saved, *now]):
        if saved.get(name) != now.get(name):
            return name
    return None


def describe_difference(name: str, saved: dict, now: dict) -> str:
    if name == "command":
        return f"they were made by `memprune {saved.get(name)}`, not `memprune {now.get(name)}`"
    if name.endswith("_sha256"):
        return f"the contents of --{name[:-len('_sha256')].replace('_', '-')} changed since they were saved"
    option = "--" + name.replace("_", "-")
    return f"they were made with {option} {saved.get(name)}, this run has {option} {now.get(name)}"


@dataclass
class PartialStats:
    """This rank's view of OUT.partial: load and save the running totals of each prompt set."""

    folder: Path
    rank: int = 0
    every_seconds: float = 60.0  # save at most this often (and always when a prompt set is done)
    _last_save: dict[str, float] = field(default_factory=dict)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.rank{self.rank}.safetensors"

    def load(self, key: str, calls: int) -> tuple[NeuronStats, int]:
        """The saved totals of prompt set `key` and how many of this rank's `calls` they cover ((empty, 0) if none)."""
        path = self.path(key)
        if not path.is_file():
            return NeuronStats(), 0
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        if int(meta["calls"]) != calls:
            raise MemPruneError(f"Partial statistics '{path}' cover another split of the work ({meta['calls']} calls, "
                                f"this run has {calls}): delete '{self.folder}' to start over.")
        return NeuronStats.from_parts(tensors, json.loads(meta["sidecar"])), int(meta["done"])

    def save(self, key: str, stats: NeuronStats, done: int, calls: int) -> None:
        """Write the totals after `done` of `calls` calls, atomically, unless a save is less than every_seconds old."""
        now = time.monotonic()
        if done < calls and now - self._last_save.get(key, float("-inf")) < self.every_seconds:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        staging = path.with_name(path.name + ".tmp")
        save_file(stats.tensors(), str(staging),
                  metadata={"sidecar": json.dumps(stats.sidecar()), "done": str(done), "calls": str(calls)})
        os.replace(staging, path)
        self._last_save[key] = now

    def holds_statistics(self) -> bool:
        return any(self.folder.glob("*.safetensors"))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def open_partial(out: str | Path, fingerprint: dict, resume: bool, overwrite: bool, processes,
                 every_seconds: float = 60.0, log: Log | None = notice) -> tuple[PartialStats, bool]:
    """Check OUT.partial against this run and prepare it; return it and whether there is something to resume.

    Without --resume an existing folder is refused (or cleared with --overwrite); with it, its settings must equal
    this run's, or the first differing setting is named. --resume with nothing to resume starts from the beginning
    and says so through `log` (one line): a script that always passes --resume works on its first run too, and a
    user who mistyped --out sees that nothing was resumed."""
    folder = partial_folder(out)
    settings_path = folder / SETTINGS_FILE
    existing = settings_path.is_file()
    if existing and resume:
        saved = read_json_object(settings_path, f"delete '{folder}' to start over")
        name = first_difference(saved, fingerprint)
        if name is not None:
            raise MemPruneError(f"Cannot resume from '{folder}': {describe_difference(name, saved, fingerprint)}; "
                                "rerun with the same settings, or delete the folder to start over.")
    elif folder.exists() and not overwrite and not resume:
        raise MemPruneError(f"'{folder}' holds the partial statistics of an interrupted run: pass --resume to continue "
                            "it, or --overwrite (or delete it) to start over.")
    if resume and not existing and processes.is_main and log is not None:
        log(f"--resume: no interrupted run to continue in '{folder}'; starting from the beginning.")
    processes.barrier()  # every rank has checked before the main one changes anything
    if processes.is_main:
        if not (existing and resume):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            staging = settings_path.with_name(SETTINGS_FILE + ".tmp")
            staging.write_text(json.dumps(fingerprint, indent=1))
            os.replace(staging, settings_path)
    processes.barrier()
    return PartialStats(folder, processes.rank, every_seconds), existing and resume
