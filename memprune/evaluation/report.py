"""An evaluation in words: the threshold lines, the metrics.md table and the summary the command prints."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from .run import EvaluationResult
from .schema import before_after
from .settings import EvaluateSettings

SUMMARY_METRICS = ["memorization_rate", "copy_similarity", "similarity_to_unedited", "diversity", "attribute_accuracy",
                   "detection_auc", "seconds_per_image", "clip_score", "fid", "kid"]


def threshold_lines(result: EvaluationResult, prefix: str = "") -> list[str]:
    """Which threshold each memorization rate used, in words."""
    lines = [f"{prefix}Copy threshold {result.threshold:.4g} (memorization_rate): "
             f"{result.threshold_info['description']}."]
    strict = result.threshold_info.get("strict")
    if strict:
        lines.append(f"{prefix}Strict copy threshold {strict['value']:.4g} (memorization_rate_strict): "
                     f"{strict['description']}.")
    if result.threshold_info.get("fixed"):
        values = ", ".join(f"{t:g}" for t in result.threshold_info["fixed"])
        lines.append(f"{prefix}Fixed copy thresholds {values} (memorization_rate@<threshold>): the share of "
                     "generations strictly above each, over the same generations as memorization_rate.")
    if result.backend.startswith("SSCD"):
        lines.append(f"{prefix}With SSCD, copy_similarity is the field's SSCD_Orig and similarity_to_unedited its "
                     "SSCD_Gen (to the unedited model's generation, same seed).")
    return lines


def _format(value: float) -> str:
    if value is None or not math.isfinite(value):
        return ""
    if float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.4g}"


def metrics_markdown(result: EvaluationResult, settings: EvaluateSettings, grids: Sequence[str] = ()) -> str:
    """A before/after table, one row per group and metric (written by hand: no tabulate dependency)."""
    table = before_after(result.metrics)
    generation = settings.generation
    guidance = generation.guidance_scale if generation.guidance_scale is not None else "pipeline default"
    lines = [
        "# memprune evaluate",
        "",
        f"- Model: `{settings.model}`"
        + "".join(f"; {name}: `{folder}`" for name, folder in settings.edited_models().items()),
        f"- Similarity backend: {result.backend}",
        *threshold_lines(result, "- "),
        f"- Generation: {generation.steps} steps, seeds {generation.seed}..{generation.seed + generation.seeds - 1}, "
        f"guidance {guidance}",
        "- diversity is a mean pairwise similarity between seeds: higher means less diverse.",
        *[f"- Note: {note}" for note in result.notes],
        "",
    ]
    models = list(table.columns)
    lines.append("| group | metric | " + " | ".join(models) + " |")
    lines.append("|---|---|" + "---:|" * len(models))
    for (group, metric), row in table.iterrows():
        lines.append(f"| {group} | {metric} | " + " | ".join(_format(row.get(m)) for m in models) + " |")
    if grids:
        lines += ["", "## Image grids", "",
                  "Rows: prompts; columns: training image (where known), unedited model by seed, "
                  "each edited model by seed. "
                  "The number under a generation is its copy similarity (* above the threshold).", ""]
        lines += [f"![{Path(g).stem}]({g})" for g in grids]
    return "\n".join(lines) + "\n"


def summary_table(result: EvaluationResult) -> str:
    """The headline metrics, one row per group and metric, one column per model (empty string when none)."""
    metric = result.metrics.metric
    table = result.metrics[metric.isin(SUMMARY_METRICS) | metric.str.startswith("memorization_rate@")]
    if table.empty:
        return ""
    return before_after(table).round(4).to_string()
