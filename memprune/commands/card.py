"""`memprune card`: rewrite the README.md model card of an edited folder with the numbers of an evaluation."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..errors import MemPruneError
from ..model_card import INFO, write_card


def run(folder: str, evaluation: str, name: str | None) -> str:
    """`memprune card`: the line the CLI prints."""
    return f"Model card: {card_from_evaluation(folder, evaluation, name)}"


def card_from_evaluation(folder: str | Path, evaluation: str | Path, edited: str | None = None) -> Path:
    """Rewrite the card of an edited folder with the numbers of an evaluate output folder (`memprune card`)."""
    folder, evaluation = Path(folder), Path(evaluation)
    if not (folder / INFO).is_file():
        raise MemPruneError(f"'{folder}' has no {INFO}: it is not a folder memprune prune/finetune wrote.")
    if not (evaluation / "metrics.csv").is_file():
        raise MemPruneError(f"'{evaluation}' has no metrics.csv: give the output folder of memprune evaluate.")
    info = json.loads((folder / INFO).read_text())
    metrics = pd.read_csv(evaluation / "metrics.csv")
    edited = edited or model_name_of(folder, evaluation, metrics)
    if edited not in set(metrics.model):
        raise MemPruneError(f"The evaluation in '{evaluation}' has no model '{edited}': evaluate this folder first "
                            f"(memprune evaluate --edited {folder}).")
    return write_card(folder, info, metrics, edited, str(evaluation))


def model_name_of(folder: Path, evaluation: Path, metrics: pd.DataFrame) -> str:
    """The column evaluate gave this folder: 'edited' for a lone --edited, else its folder name (see run.json)."""
    run = evaluation / "run.json"
    if run.is_file():
        settings = json.loads(run.read_text()).get("settings", {})
        folders = ([settings.get("edited")] if settings.get("edited") else []) + list(settings.get("compare") or [])
        if len(folders) == 1 and not settings.get("compare"):
            return "edited"
    return folder.resolve().name
