"""comparison.png: each model's memorization against its utility, without and under the attack."""
from __future__ import annotations

import math

import matplotlib.figure
import pandas as pd

from ..plots import save_figure

__all__ = ["comparison_figure", "save_figure"]

# (group, metric) in order of preference: the held-out prompts when a located sample left some out
MEMORIZATION = (("memorized_held_out", "memorization_rate"), ("memorized", "memorization_rate"))
ATTACKED = (("memorized_held_out", "memorization_rate_attacked"), ("memorized", "memorization_rate_attacked"))
UTILITY = (("general", "similarity_to_unedited"), ("same_style_control", "similarity_to_unedited"),
           ("non_memorized", "similarity_to_unedited"))


def _first_present(values: pd.Series, choices) -> tuple[str, str] | None:
    present = set(zip(values.index.get_level_values("group"), values.index.get_level_values("metric"), strict=True))
    return next((choice for choice in choices if choice in present), None)


def comparison_figure(metrics: pd.DataFrame, models: list[str], labels: dict[str, str]) -> matplotlib.figure.Figure:
    """Two panels, one point per model: memorization rate (y) against similarity to the unedited model's images of
    non-memorized prompts (x, utility kept: 1 is untouched), as evaluated and under the attack."""
    values = metrics.set_index(["model", "group", "metric"]).value
    utility = _first_present(values, UTILITY)
    panels = [(choice, title) for choice, title in ((_first_present(values, MEMORIZATION), "as evaluated"),
                                                     (_first_present(values, ATTACKED), "under attack"))
              if choice is not None]
    figure = matplotlib.figure.Figure(figsize=(6 * max(len(panels), 1), 4.5))
    axes = figure.subplots(1, max(len(panels), 1), squeeze=False)[0]
    if utility is None or not panels:
        axes[0].text(0.5, 0.5, "no memorization or utility metric to plot", ha="center", va="center")
        return figure
    for axis, ((group, metric), title) in zip(axes, panels, strict=True):
        for model in models:
            x = values.get((model, *utility), math.nan)
            y = values.get((model, group, metric), math.nan)
            if model == "unedited":
                x = 1.0 if math.isnan(x) else x  # the unedited model is its own reference
            if math.isnan(x) or math.isnan(y):
                continue
            axis.scatter([x], [y], color="black" if model == "unedited" else None)
            axis.annotate(labels.get(model, model), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        axis.set_xlabel(f"utility: {utility[1].replace('_', ' ')} ({utility[0].replace('_', ' ')} prompts)")
        axis.set_ylabel(f"{metric.replace('_', ' ')} ({group.replace('_', ' ')})")
        axis.set_ylim(-0.03, 1.03)  # rates: the same scale in both panels
        axis.set_title(title)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure
