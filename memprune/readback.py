"""Read back the files memprune writes and later takes as input: an evaluate folder's metrics.csv and run.json,
an edited folder's memprune.json.

`evaluate`, `attack --threshold-from` and `card` read them through these functions, so a file that is binary,
truncated, not JSON/CSV, a JSON value that is not an object or a table without the tidy columns is refused in one
sentence naming the file, never with a UnicodeDecodeError, JSONDecodeError or AttributeError traceback.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import MemPruneError

METRICS_COLUMNS = ("model", "group", "metric", "value")  # evaluate's and attack's tidy metrics.csv


def _text(path: Path, what: str) -> str:
    if not path.is_file():
        raise MemPruneError(f"'{path}' does not exist: {what}.")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MemPruneError(f"'{path}' is not UTF-8 text (byte {exc.start}): {what}.") from exc


def read_json_object(path: str | Path, what: str) -> dict[str, Any]:
    """A JSON file holding one object; `what` says what the file should be (ends the one-sentence refusal)."""
    path = Path(path)
    text = _text(path, what)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MemPruneError(f"'{path}' is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}): "
                            f"{what}.") from exc
    if not isinstance(value, dict):
        raise MemPruneError(f"'{path}' holds a JSON {type(value).__name__}, not an object: {what}.")
    return value


def read_metrics_csv(path: str | Path, what: str = "give an output folder of memprune evaluate") -> pd.DataFrame:
    """A tidy metrics.csv (model, group, metric, value) with numeric values."""
    path = Path(path)
    _text(path, what)  # refuse binary files with the file named, before pandas sees them
    try:
        metrics = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
        raise MemPruneError(f"'{path}' is not a readable CSV table ({reason}): {what}.") from exc
    missing = [column for column in METRICS_COLUMNS if column not in metrics.columns]
    if missing:
        raise MemPruneError(f"'{path}' has no {', '.join(missing)} column{'s' if len(missing) > 1 else ''}: {what}.")
    values = pd.to_numeric(metrics["value"], errors="coerce")
    bad = metrics["value"].notna() & values.isna()
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0])
        raise MemPruneError(f"'{path}' line {row + 2} has a value that is not a number "
                            f"({metrics['value'].iloc[row]!r}): {what}.")
    metrics["value"] = values
    return metrics


def read_run_settings(folder: str | Path, what: str = "give an output folder of memprune evaluate") -> dict[str, Any]:
    """The `settings` object of a folder's run.json ({} when the folder has no run.json)."""
    path = Path(folder) / "run.json"
    if not path.is_file():
        return {}
    settings = read_json_object(path, what).get("settings", {})
    if not isinstance(settings, dict):
        raise MemPruneError(f"'{path}' has a 'settings' entry that is not an object: {what}.")
    return settings
