"""The benchmark folder and its state file: what a killed run finished, so that `--resume` skips it.

DIR/arms.toml is the arms file the run started with, DIR/benchmark.json the state: each arm's fingerprint (what it
builds), the run's settings, the models built (with their building seconds) and the stages done (evaluate, attack).
Every model is written atomically into DIR/models/NAME, so a model the state lists as built whose folder holds a
complete pipeline is done; a stage is recorded only after its command wrote its folder.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MemPruneError
from ..runinfo import check_output_dir
from .arms import Arm

STATE_FILE = "benchmark.json"
ARMS_FILE = "arms.toml"
COMPLETE_MARKER = "model_index.json"  # every saved diffusers pipeline folder has it


@dataclass
class BenchmarkState:
    folder: Path
    arms: dict[str, str]  # arm name -> fingerprint
    settings: dict[str, Any]
    built: dict[str, float] = field(default_factory=dict)  # model column -> seconds its build took
    stages: list[str] = field(default_factory=list)  # finished runs: evaluate, attack (or evaluate:NAME, ...)

    def save(self) -> None:
        record = {"arms": self.arms, "settings": self.settings, "built": self.built, "stages": self.stages}
        temporary = self.folder / f".{STATE_FILE}.tmp"
        temporary.write_text(json.dumps(record, indent=1))
        os.replace(temporary, self.folder / STATE_FILE)  # a kill never leaves half a state file

    def model_folder(self, column: str) -> Path:
        return self.folder / "models" / column

    def is_built(self, column: str) -> bool:
        return column in self.built and (self.model_folder(column) / COMPLETE_MARKER).is_file()

    def mark_built(self, column: str, seconds: float) -> None:
        self.built[column] = round(seconds, 3)
        self.save()

    def mark_stage(self, stage: str) -> None:
        if stage not in self.stages:
            self.stages.append(stage)
        self.save()

    def forget_stages(self, column: str) -> None:
        """`column` is (re)built: the runs that scored all models, or it alone, must see it."""
        stale = {"evaluate", "attack", f"evaluate:{column}", f"attack:{column}"}
        if stale & set(self.stages):
            self.stages = [stage for stage in self.stages if stage not in stale]
            self.save()


def open_folder(out: str | Path, arms: list[Arm], arms_text: str, settings: dict[str, Any], resume: bool,
                overwrite: bool, protected: list[str],
                setting_defaults: dict[str, Any] | None = None) -> BenchmarkState:
    """A new benchmark folder (refused when it exists, unless --overwrite) or, with `resume`, the state of the one
    there, refused when its arms or settings differ from these (naming the first that does). A setting the saved
    state lacks (a run started by an older memprune) counts as its default in `setting_defaults`."""
    out = Path(out)
    fingerprints = {arm.name: arm.fingerprint() for arm in arms}
    if resume:
        if not (out / STATE_FILE).is_file():
            raise MemPruneError(f"Nothing to resume: '{out}' holds no {STATE_FILE} of an earlier `memprune benchmark`.")
        check_output_dir(out, True, protected)
        record = json.loads((out / STATE_FILE).read_text())
        _refuse_changes(record["arms"], fingerprints, {**(setting_defaults or {}), **record["settings"]}, settings)
        return BenchmarkState(out, fingerprints, settings, record.get("built", {}), record.get("stages", []))
    if out.exists() and not overwrite:
        raise MemPruneError(f"Output folder '{out}' already exists: pass --resume to continue that benchmark or "
                            "--overwrite to start it again.")
    check_output_dir(out, overwrite, protected)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / ARMS_FILE).write_text(arms_text)
    state = BenchmarkState(out, fingerprints, settings)
    state.save()
    return state


def _refuse_changes(saved_arms: dict[str, str], arms: dict[str, str], saved_settings: dict[str, Any],
                    settings: dict[str, Any]) -> None:
    for name in dict.fromkeys([*saved_arms, *arms]):
        if name not in arms:
            change = "is gone from the arms file"
        elif name not in saved_arms:
            change = "is new in the arms file"
        elif saved_arms[name] != arms[name]:
            change = "has changed settings"
        else:
            continue
        raise MemPruneError(f"Cannot resume: arm '{name}' {change} since the benchmark started; run it into a new "
                            "--out (or pass --overwrite to start again).")
    for key in dict.fromkeys([*saved_settings, *settings]):
        if saved_settings.get(key) != settings.get(key):
            raise MemPruneError(f"Cannot resume: the benchmark's {key} was {saved_settings.get(key)!r} and is now "
                                f"{settings.get(key)!r}; resume with the same settings or start a new --out.")
