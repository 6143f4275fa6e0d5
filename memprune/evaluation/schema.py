"""The names in evaluate's tidy metrics table (metrics.csv: model, group, metric, value) and their order.

Its own small module because readers of an evaluation (the model card, memprune.compare) need these names without
importing the evaluation itself.
"""
from __future__ import annotations

import pandas as pd

GROUPS = ("memorized", "memorized_held_out", "non_memorized", "same_style_control", "general", "fid_prompts")
MEMORIZED_GROUPS = ("memorized", "memorized_held_out")
NON_MEMORIZED_GROUPS = ("non_memorized", "same_style_control", "general")
METRICS = (
    "n_prompts", "n_generations", "copy_threshold", "copy_threshold_strict", "memorization_rate",
    "memorization_rate_strict", "memorization_rate@", "copy_similarity", "similarity_to_unedited",
    "diversity", "clip_score", "fid", "kid", "kid_std", "attribute_accuracy", "detection_score",
    "detection_score_first_step", "detection_auc",
    "detection_auc_first_step", "seconds_per_image", "seconds_per_image_ratio",
    "mitigation_target", "mitigation_iterations", "mitigation_target_reached", "mitigation_neurons",
)
COLUMNS = ["model", "group", "metric", "value"]
# memorization_rate@<t>: the rate at a fixed copy threshold t (memprune.evaluation.fixed_thresholds), sorted by t;
# similarity_to_unedited is the field's SSCD_Gen (with an SSCD backend) and copy_similarity its SSCD_Orig;
# clip_score, fid, kid: memprune.evaluation.clip_score and .fid (group fid_prompts: the FID captions).


def metric_rank(name: str) -> tuple[int, float]:
    """Where a metric sorts: its place in METRICS; a fixed-threshold rate after the strict rate, by threshold."""
    if "@" in name:
        threshold = name.split("@", 1)[1]
        return METRICS.index("memorization_rate@"), float(threshold)
    return METRICS.index(name), 0.0


def random_control_name(edited_name: str) -> str:
    """The column of the random control beside an edited model's column."""
    return "random_control" if edited_name == "edited" else f"{edited_name}_random_control"


def sort_metrics(metrics: pd.DataFrame, models: list[str]) -> pd.DataFrame:
    """Rows by model (in `models` order), then GROUPS order, then METRICS order; ties keep their order."""
    return metrics.assign(
        _m=metrics.model.map({m: i for i, m in enumerate(models)}),
        _g=metrics.group.map({g: i for i, g in enumerate(GROUPS)}),
        _k=metrics.metric.map(metric_rank),
    ).sort_values(["_m", "_g", "_k"], kind="stable").drop(columns=["_m", "_g", "_k"]).reset_index(drop=True)


def before_after(metrics: pd.DataFrame) -> pd.DataFrame:
    """Rows (group, metric) in GROUPS and METRICS order, one column per model (unedited first)."""
    table = metrics.pivot_table(index=["group", "metric"], columns="model", values="value", sort=False)
    order = sorted(table.index, key=lambda key: (GROUPS.index(key[0]), metric_rank(key[1])))
    return table.loc[order, list(dict.fromkeys(metrics.model))]
