"""README.md model cards (Hugging Face style) for the pipeline folders memprune writes (prune, finetune).

The card is rendered from the folder's memprune.json (what was edited, from which base, with which settings) and,
when known, from an evaluation's metrics.csv (`memprune card DIR --evaluation EVAL_DIR` after `memprune evaluate`):
the edit beside the unedited model and the random control, so the card's numbers carry their control too.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import pandas as pd

from .runinfo import apply_default_permissions

CARD = "README.md"
INFO = "memprune.json"
# (group, metric, label, percentage?) shown on the card, when the evaluation has them
CARD_METRICS = (
    ("memorized_held_out", "memorization_rate", "held-out memorized prompts: memorization rate", True),
    ("memorized_held_out", "memorization_rate_strict",
     "held-out memorized prompts: memorization rate (strict threshold)", True),
    ("memorized", "memorization_rate", "memorized prompts: memorization rate", True),
    ("memorized", "memorization_rate_strict", "memorized prompts: memorization rate (strict threshold)", True),
    ("memorized_held_out", "copy_similarity", "held-out memorized prompts: copy similarity", False),
    ("memorized", "copy_similarity", "memorized prompts: copy similarity", False),
    ("same_style_control", "memorization_rate", "same-style controls: memorization rate", True),
    ("same_style_control", "similarity_to_unedited", "same-style controls: similarity to unedited", False),
    ("general", "similarity_to_unedited", "general captions: similarity to unedited", False),
    ("general", "attribute_accuracy", "general captions: attribute accuracy", True),
    ("memorized", "seconds_per_image_ratio", "seconds per image vs unedited", False),
)


def _front_matter(info: dict) -> str:
    tags = ["memprune", "memorization", "text-to-image", "diffusers", info.get("method", "pruning")]
    lines = ["---", "library_name: diffusers", f"base_model: {info.get('source', 'unknown')}", "tags:"]
    lines += [f"- {tag}" for tag in dict.fromkeys(tags)]
    return "\n".join(lines + ["---", ""])


def _edit_section(info: dict) -> list[str]:
    selection = info.get("selection")
    method = info.get("method") or (selection.get("method") if isinstance(selection, dict) else None) or "wanda"
    lines = ["## What was edited", "", f"- Base model: `{info.get('source', 'unknown')}`", f"- Method: {method}"]
    if "total_zeroed" in info:
        zeroed = info.get("zeroed_weights", {})
        shares = info.get("zeroed_share", {})
        mean_share = sum(shares.values()) / len(shares) if shares else float("nan")
        lines.append(f"- Zeroed weights: {info['total_zeroed']} in {len(zeroed)} layers "
                     f"(mean share per layer {mean_share:.3%}); biases untouched")
    if "timesteps" in info:
        lines.append(f"- Masks: union of sampling steps 0..{info['timesteps'] - 1} (τ = {info['timesteps']})")
    for key in ("selection", "settings"):
        if info.get(key):
            lines.append(f"- {key.capitalize()}: `{json.dumps(info[key], sort_keys=True, default=str)}`")
    if info.get("changed_parameters"):
        lines.append(f"- Changed parameters: {len(info['changed_parameters'])} tensors")
    lines.append(f"- Full record: `{INFO}` in this folder")
    return lines + [""]


def metric_value(metrics: pd.DataFrame, model: str, group: str, metric: str) -> float:
    """One value of a tidy metrics table (evaluate's metrics.csv), NaN when absent."""
    rows = metrics[(metrics.model == model) & (metrics.group == group) & (metrics.metric == metric)]
    return float(rows.value.iloc[0]) if len(rows) else float("nan")


def _evaluation_section(metrics: pd.DataFrame | None, edited: str, source: str | None) -> list[str]:
    if metrics is None:
        return ["## Evaluation", "", "Not evaluated yet: run `memprune evaluate --edited THIS_FOLDER ...`, then "
                "`memprune card THIS_FOLDER --evaluation EVAL_FOLDER` to put the numbers here.", ""]
    from .evaluation.schema import random_control_name

    control = random_control_name(edited)
    models = [m for m in ("unedited", edited, control) if m in set(metrics.model)]
    header = {"unedited": "unedited", edited: "this model", control: "random control, same size"}
    lines = ["## Evaluation", ""]
    if source:
        lines += [f"From `memprune evaluate` ({source}); the random control zeroes as many random weights per tensor "
                  "as this edit does.", ""]
    lines += ["| metric | " + " | ".join(header[m] for m in models) + " |", "|---|" + "---:|" * len(models)]
    for group, metric, label, percent in CARD_METRICS:
        values = [metric_value(metrics, m, group, metric) for m in models]
        if all(math.isnan(v) for v in values):
            continue
        cells = ["" if math.isnan(v) else (f"{v:.1%}" if percent else f"{v:.3f}") for v in values]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def _usage_section() -> list[str]:
    return ["## How to load it", "", "```python", "from diffusers import DiffusionPipeline", "",
            'pipe = DiffusionPipeline.from_pretrained("path/to/this/folder", use_safetensors=True)',
            'image = pipe("a prompt").images[0]', "```", "",
            "A stock diffusers pipeline: memprune is not needed to use it.", ""]


def render_card(info: dict, metrics: pd.DataFrame | None = None, edited: str = "edited",
                evaluation_source: str | None = None) -> str:
    title = f"# {info.get('method', 'memprune')} edit of {Path(str(info.get('source', 'a model'))).name}"
    lines = [_front_matter(info), title, "",
             "This pipeline was edited with memprune to stop it reproducing memorized training "
             "images, without retraining.", ""]
    lines += _edit_section(info) + _evaluation_section(metrics, edited, evaluation_source) + _usage_section()
    return "\n".join(lines)


def write_card(folder: str | Path, info: dict, metrics: pd.DataFrame | None = None, edited: str = "edited",
               evaluation_source: str | None = None) -> Path:
    """Write README.md into `folder` atomically (temporary file + rename)."""
    path = Path(folder) / CARD
    text = render_card(info, metrics, edited, evaluation_source)  # before the temporary file: no stray on error
    descriptor, temporary = tempfile.mkstemp(prefix=".README.", dir=folder)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
        apply_default_permissions(temporary)  # mkstemp's 0600 would make the card unreadable to others
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
