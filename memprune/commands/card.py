"""`memprune card`: rewrite the README.md model card of an edited folder with the numbers of an evaluation."""
from __future__ import annotations

from pathlib import Path

from ..errors import MemPruneError
from ..model_card import INFO, write_card
from ..readback import read_json_object, read_metrics_csv, read_run_settings


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
    info = read_json_object(folder / INFO, "it should be the record memprune prune/finetune wrote")
    metrics = read_metrics_csv(evaluation / "metrics.csv")
    edited = edited or model_name_of(folder, evaluation)
    if edited not in set(metrics.model):
        raise MemPruneError(f"The evaluation in '{evaluation}' has no model '{edited}': evaluate this folder first "
                            f"(memprune evaluate --edited {folder}).")
    return write_card(folder, info, metrics, edited, str(evaluation))


def model_name_of(folder: Path, evaluation: Path) -> str:
    """The column evaluate gave this folder: 'edited' for a lone --edited, else its folder name (see run.json)."""
    settings = read_run_settings(evaluation)
    if settings.get("edited") and not settings.get("compare"):
        return "edited"
    return folder.resolve().name
