"""One comparison of editing methods on the same model, seeds and metrics (issue: peers in one harness).

`bench/compare_methods.py` builds every edit (Wanda at two ratios, a size-matched random mask, NeMo, UniForget,
the fine-tunes, Wen's mitigation), runs one `memprune evaluate --compare ...` over all of them (same seeds, one
copy threshold) and one `memprune attack` over the same models, and hands the three outputs to this module:

- `comparison_metrics` joins evaluate's metrics.csv, attack's metrics.csv (its memorized group and its control groups,
  the attack's false-positive floor) and the editing cost of each model into one tidy table, one row per
  (model, group, metric), refusing duplicates;
- `comparison_table` picks the headline columns (one row per model) and `comparison_markdown` writes them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from .errors import MemPruneError

TIDY = ["model", "group", "metric", "value"]
EDIT_GROUP = "edit"  # the group of per-model rows that belong to no prompt group (editing cost)


@dataclass(frozen=True)
class Column:
    header: str
    group: str
    metric: str
    kind: str  # "rate" (shown as a percentage), "number", "ratio", "seconds"


COLUMNS = (
    Column("held-out memorization", "memorized_held_out", "memorization_rate", "rate"),
    Column("held-out memorization (strict)", "memorized_held_out", "memorization_rate_strict", "rate"),
    Column("held-out copy similarity", "memorized_held_out", "copy_similarity", "number"),
    Column("same-style control: similarity to unedited", "same_style_control", "similarity_to_unedited", "number"),
    Column("general: similarity to unedited", "general", "similarity_to_unedited", "number"),
    Column("attribute accuracy", "general", "attribute_accuracy", "rate"),
    Column("s / image vs unedited", "memorized", "seconds_per_image_ratio", "ratio"),
    Column("editing cost (s)", EDIT_GROUP, "edit_seconds", "seconds"),
    Column("memorization under attack", "memorized_held_out", "memorization_rate_attacked", "rate"),
    Column("copy similarity under attack", "memorized_held_out", "copy_similarity_attacked", "number"),
    # the attack's false-positive floor beside it (memprune.attack.groups): the same attack on images not memorized
    Column("floor: same-style control under attack", "same_style_control", "memorization_rate_attacked", "rate"),
    Column("floor: unseen images under attack", "unseen", "memorization_rate_attacked", "rate"),
)


def _tidy(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    missing = [c for c in TIDY if c not in frame.columns]
    if missing:
        raise MemPruneError(f"The {name} metrics have no column '{missing[0]}': "
                            "expected the tidy model, group, metric, "
                            "value schema of memprune evaluate/attack.")
    return frame[TIDY]


def comparison_metrics(evaluation: pd.DataFrame, attack: pd.DataFrame | None = None,
                       edit_seconds: dict[str, float] | None = None) -> pd.DataFrame:
    """evaluate's metrics, the attack's *_attacked metrics and edit_seconds per model, one row per
    (model, group, metric).

    Attack metrics that evaluate also reports (the attack's own non-attacked baseline) are left to evaluate, which
    ran every model on the same seeds; a key present twice otherwise is refused.
    """
    parts = [_tidy(evaluation, "evaluate")]
    if attack is not None:
        attack = _tidy(attack, "attack")
        parts.append(attack[attack.metric.str.endswith("_attacked")])
    if edit_seconds:
        parts.append(pd.DataFrame([(model, EDIT_GROUP, "edit_seconds", float(seconds))
                                   for model, seconds in edit_seconds.items()], columns=TIDY))
    table = pd.concat(parts, ignore_index=True)
    duplicated = table.duplicated(["model", "group", "metric"], keep=False)
    if duplicated.any():
        model, group, metric = table[duplicated].iloc[0][["model", "group", "metric"]]
        raise MemPruneError(f"Two values for model '{model}', group '{group}', metric '{metric}': "
                            "the comparison needs one row per (model, group, metric).")
    return table


def comparison_table(metrics: pd.DataFrame, models: list[str] | None = None,
                     labels: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per model (in `models` order, default: as they appear), one column per headline metric present."""
    models = models or list(dict.fromkeys(metrics.model))
    labels = labels or {}
    index = metrics.set_index(["model", "group", "metric"]).value
    rows = []
    for model in models:
        row = {"model": labels.get(model, model)}
        for column in COLUMNS:
            row[column.header] = index.get((model, column.group, column.metric), float("nan"))
        rows.append(row)
    table = pd.DataFrame(rows).set_index("model")
    present = [c.header for c in COLUMNS if table[c.header].notna().any()]
    return table[present]


def _format(value: float, kind: str) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    if kind == "rate":
        return f"{value:.1%}"
    if kind == "ratio":
        return f"{value:.2f}×"
    if kind == "seconds":
        return f"{value:.0f}"
    return f"{value:.3f}"


def comparison_markdown(table: pd.DataFrame) -> str:
    kinds = {c.header: c.kind for c in COLUMNS}
    lines = ["| method | " + " | ".join(table.columns) + " |", "|---|" + "---:|" * len(table.columns)]
    for model, row in table.iterrows():
        lines.append(f"| {model} | " + " | ".join(_format(row[c], kinds[c]) for c in table.columns) + " |")
    return "\n".join(lines) + "\n"
