"""The attack-budget curve: copy rate against attack steps, memorized prompts beside the control groups.

One attack run keeps the attacked embedding at a few steps (``BUDGET_STEPS`` up to --attack-steps, always 0 and the
last), generates from each on the run's fresh seeds and scores the copies with the run's threshold: the rate at
step 0 is the unattacked rate (for ``--init prompt``), at the last step the attacked one. A memorized group whose
curve rises no faster than its controls' is no evidence of memorization surviving the edit.

Measured 2026-12-04 on the v-prediction testbed (DoRI's defaults, 6 held-out memorized captions and 6 of each
control group, 2 fresh seeds, 25 sampling steps, threshold 0.384 calibrated as evaluate does): after 50 steps the
attack brings back 83% of the same-style control and 83% of never-seen images on the unedited model (0% unattacked),
against 92% of the memorized ones; on a Wanda ratio-0.1 prune 100% / 50% against 83% (58% unattacked). At 5–10
steps the controls stay at 0–25% while the prune's memorized copies return (58% -> 83%): on this testbed only the
short-budget end of the curve separates memorization from the attacker's own power.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.figure
import pandas as pd

from ..evaluation.metrics import memorization_rate

BUDGET_STEPS = (0, 5, 10, 25, 50)
BUDGET_COLUMNS = ["model", "group", "attack_steps", "memorization_rate", "copy_similarity", "n_generations"]


def budget_checkpoints(steps: tuple[int, ...], attack_steps: int) -> tuple[int, ...]:
    """The steps of the curve: the given ones up to attack_steps, plus 0 and attack_steps."""
    return tuple(sorted({k for k in steps if 0 <= k <= attack_steps} | {0, attack_steps}))


def budget_curve(generations: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Per (model, group, attack_steps): the copy rate (similarity strictly above `threshold`), the mean copy
    similarity and the number of generations, from rows with model, group, attack_steps, copy_similarity."""
    rows = []
    for (model, group, steps), part in generations.groupby(["model", "group", "attack_steps"], sort=False):
        values = part.copy_similarity.to_numpy()
        rows.append((model, group, int(steps), memorization_rate(values, threshold), float(values.mean()),
                     len(values)))
    curve = pd.DataFrame(rows, columns=BUDGET_COLUMNS)
    first = {column: {name: i for i, name in enumerate(dict.fromkeys(generations[column]))}
             for column in ("model", "group")}  # the run's order, not the alphabet's
    rank = curve.assign(model_rank=curve.model.map(first["model"]), group_rank=curve.group.map(first["group"]))
    return rank.sort_values(["model_rank", "group_rank", "attack_steps"])[BUDGET_COLUMNS].reset_index(drop=True)


def budget_figure(curve: pd.DataFrame, threshold: float) -> matplotlib.figure.Figure:
    """One panel per model: copy rate against attack steps, one line per group."""
    models = list(dict.fromkeys(curve.model))
    columns = min(len(models), 4)
    rows = -(-len(models) // columns)
    figure = matplotlib.figure.Figure(figsize=(3.6 * columns, 3.0 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False, sharey=True)
    for ax, model in zip(axes.flat, models, strict=False):
        for group, part in curve[curve.model == model].groupby("group", sort=False):
            ax.plot(part.attack_steps, part.memorization_rate, marker="o", label=group)
        ax.set_title(model)
        ax.set_xlabel("attack steps")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel(f"copy rate (similarity > {threshold:.3f})")
    for ax in list(axes.flat)[len(models):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize="small")
    return figure


def write_budget(curve: pd.DataFrame, threshold: float, folder: str | Path) -> None:
    """budget.csv and budget.png in `folder`."""
    folder = Path(folder)
    curve.to_csv(folder / "budget.csv", index=False)
    budget_figure(curve, threshold).savefig(folder / "budget.png", dpi=120)
