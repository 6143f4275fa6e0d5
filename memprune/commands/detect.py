"""`memprune detect`: score prompts with Wen et al.'s noise norm into FILE.csv, the ROC and run info into FILE.json."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..detect import DetectSettings, detect, prompt_labels, require_cfg
from ..errors import MemPruneError
from ..generate import GenerationSettings
from ..models import load_pipeline, resolve_device
from ..prompts import read_prompts
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


def _atomic_write(path: Path, write) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def summary_path(out: str | Path) -> Path:
    """The JSON written beside FILE.csv: FILE.json."""
    return Path(out).with_suffix(".json")


def detect_to_file(settings: DetectSettings, out: str | Path, overwrite: bool = False, device: str = "auto",
                   dtype=None, progress: bool = True) -> str:
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
    prompts = read_prompts(settings.prompts)
    prompt_labels(prompts)  # refuse bad labels before loading a model
    timer = Timer()
    with timer("load"):
        pipe = load_pipeline(settings.model, resolve_device(device), dtype)
    require_cfg(pipe, settings.generation)
    with timer("detect"):
        result = detect(pipe, prompts, settings.generation, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.run-") as staging:
        write_run_json(staging, settings, {"prompts": settings.prompts}, timer.seconds, roc=result.roc,
                       prompts=len(prompts), scores_file=str(out))
        record = json.loads((Path(staging) / "run.json").read_text())
    _atomic_write(out, lambda path: result.scores.to_csv(path, index=False))
    _atomic_write(json_path, lambda path: Path(path).write_text(json.dumps(record, indent=1)))
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
