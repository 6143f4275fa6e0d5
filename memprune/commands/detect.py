"""`memprune detect`: score prompts with Wen et al.'s noise norm into FILE.csv, the ROC and run info into FILE.json."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..detect import DetectSettings, detect, prompt_labels, require_cfg
from ..errors import MemPruneError
from ..generate import GenerationSettings
from ..models import load_pipeline, resolve_device
from ..prompts import read_prompts
from ..runinfo import Log, apply_default_permissions, notice, remove_stale_staging, staging_dir
from .defaults import model_or_default
from .output import Timer, write_run_json


def run(options: dict[str, Any]) -> str:
    """`memprune detect` with the CLI's options."""
    settings = DetectSettings(
        model=model_or_default(options["model"]), prompts=options["prompts"],
        generation=GenerationSettings(steps=options["steps"], seeds=options["seeds"], seed=options["seed"],
                                      guidance_scale=options["guidance_scale"], batch_size=options["batch_size"],
                                      height=options.get("height"), width=options.get("width")),
    )
    return detect_to_file(settings, options["out"], overwrite=options["overwrite"], device=options["device"],
                          dtype=options["dtype"])


def _write_files(out: Path, json_path: Path, write_scores, write_run_json_into) -> None:
    """Write FILE.csv and FILE.json through one staging folder `.FILE.csv.run-PID-*` beside them, renamed into place
    file by file: a killed run leaves only that folder, which the next run with the same --out removes."""
    staging = staging_dir(out, "run")
    try:
        record = json.loads(write_run_json_into(staging).read_text())
        (staging / "run.json").unlink()
        write_scores(staging / out.name)
        (staging / json_path.name).write_text(json.dumps(record, indent=1))
        apply_default_permissions(staging)
        os.replace(staging / out.name, out)
        os.replace(staging / json_path.name, json_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def summary_path(out: str | Path) -> Path:
    """The JSON written beside FILE.csv: FILE.json."""
    return Path(out).with_suffix(".json")


def detect_to_file(settings: DetectSettings, out: str | Path, overwrite: bool = False, device: str = "auto",
                   dtype=None, progress: bool = True, log: Log | None = notice) -> str:
    """The `memprune detect` command as a function: scores to FILE.csv, ROC and run info to FILE.json."""
    out = Path(out)
    if out.suffix.lower() != ".csv":
        raise MemPruneError(f"--out '{out}' must name a .csv file (the ROC summary goes beside it as .json).")
    if out.is_dir():
        raise MemPruneError(f"--out '{out}' is a folder: give a .csv file name.")
    json_path = summary_path(out)
    for path in (out, json_path):
        if path.exists() and not overwrite:
            raise MemPruneError(f"Output file '{path}' already exists: choose another --out or pass --overwrite.")
    model_path = Path(settings.model).resolve()
    if Path(settings.model).exists() and (model_path == out.resolve().parent or model_path in out.resolve().parents):
        raise MemPruneError(f"Output file '{out}' lies inside the model folder: memprune never writes into a source.")
    remove_stale_staging(out, log)  # what killed runs with this --out left, as check_output_dir does for folders
    prompts = read_prompts(settings.prompts)
    prompt_labels(prompts)  # refuse bad labels before loading a model
    timer = Timer()
    with timer("load"):
        pipe = load_pipeline(settings.model, resolve_device(device), dtype)
    require_cfg(pipe, settings.generation)
    with timer("detect"):
        result = detect(pipe, prompts, settings.generation, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_files(out, json_path, lambda path: result.scores.to_csv(path, index=False),
                 lambda staging: write_run_json(staging, settings, {"prompts": settings.prompts}, timer.seconds,
                                                roc=result.roc, prompts=len(prompts), scores_file=str(out)))
    lines = [f"Scored {len(prompts)} prompts x {settings.generation.seeds} seeds "
             f"({settings.generation.steps} steps): mean score {result.scores['detection_score'].mean():.4f}."]
    for column, roc in result.roc.items():
        if roc["auc"] is None:
            lines.append(f"{column}: {roc['note']} ({roc['positives']} memorized, {roc['negatives']} non-memorized).")
        else:
            lines.append(f"{column}: ROC AUC {roc['auc']:.4f}, TPR at 1% FPR {roc['tpr_at_1pct_fpr']:.4f} "
                         f"({roc['positives']} memorized vs {roc['negatives']} non-memorized).")
    lines.append(f"Scores: {out}\nSummary: {json_path}")
    return "\n".join(lines)
