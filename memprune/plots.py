"""Figures from the tidy tables memprune writes (overlap.csv, masks, sweeps): matplotlib Figures; image grids of an
evaluation (prompts × seeds, before/after, training image beside) as PIL images."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import matplotlib.figure
import matplotlib.pyplot as plt  # no backend forced: notebooks keep their inline one, headless runs get Agg
import matplotlib.ticker
import numpy as np
import pandas as pd

COMPARISON_LABELS = {
    ("memorized", "memorized"): "memorized vs memorized",
    ("memorized", "non_memorized"): "memorized vs non-memorized (control)",
    ("non_memorized", "non_memorized"): "non-memorized vs non-memorized (control)",
}


def _subplots(nrows: int = 1, ncols: int = 1, squeeze: bool = True, **figure_kwargs):
    """Like plt.subplots, but the Figure is not registered with pyplot: a notebook shows it once (as the cell's
    value), scripts never accumulate open figures, and nothing depends on the backend."""
    fig = matplotlib.figure.Figure(**figure_kwargs)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def short_layer_name(layer: str) -> str:
    """down_blocks.1.attentions.0.transformer_blocks.0.ff -> down1.a0.t0; mid_block.attentions.0... -> mid.a0.t0"""
    short = layer.removesuffix(".ff")
    for long, abbreviation in (("down_blocks.", "down"), ("up_blocks.", "up"), ("mid_block", "mid"),
                               (".attentions.", ".a"), (".transformer_blocks.", ".t")):
        short = short.replace(long, abbreviation)
    return short


def unet_order(layers) -> list[str]:
    """Layers in the order data flows through a UNet (down, mid, up); diffusers registers mid_block last."""
    rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return sorted(layers, key=lambda layer: rank.get(layer.split(".")[0], 1))  # stable: keeps order within a part


def _comparison(overlap: pd.DataFrame) -> pd.Series:
    pairs = zip(overlap.group_a, overlap.group_b, strict=True)
    return pd.Series([COMPARISON_LABELS.get((a, b), f"{a} vs {b}") for a, b in pairs],
                     index=overlap.index)


def iou_heatmap(overlap: pd.DataFrame, group: str = "memorized") -> plt.Figure:
    """Mean pairwise IoU of `group` subsets per layer (rows) and step (columns)."""
    within = overlap[(overlap.group_a == group) & (overlap.group_b == group)]
    table = within.pivot_table(index="layer", columns="step", values="iou", aggfunc="mean", sort=False)
    table = table.loc[unet_order(table.index)]
    fig, ax = _subplots(figsize=(max(6, 0.18 * table.shape[1] + 3), max(3, 0.35 * table.shape[0] + 1.5)))
    image = ax.imshow(table.to_numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(table.index)), [short_layer_name(name) for name in table.index], fontsize=8)
    step_ticks = list(range(0, table.shape[1], max(1, table.shape[1] // 10)))
    ax.set_xticks(step_ticks, [str(table.columns[i]) for i in step_ticks])
    ax.set_xlabel("sampling step (0 = noisiest)")
    ax.set_ylabel("FeedForward layer")
    ax.set_title(f"Mask IoU between {group.replace('_', '-')} subsets (mean over pairs)")
    fig.colorbar(image, ax=ax, label="IoU")
    fig.tight_layout()
    return fig


def _iou_lines(overlap: pd.DataFrame, by: str, xlabel: str, title: str) -> plt.Figure:
    frame = overlap.assign(comparison=_comparison(overlap))
    fig, ax = _subplots(figsize=(8, 4))
    for comparison, group in frame.groupby("comparison", sort=False):
        means = group.groupby(by, sort=False)["iou"].agg(["mean", "std"])
        if by == "layer":
            means = means.loc[unet_order(means.index)]
        x = range(len(means)) if by == "layer" else means.index
        ax.errorbar(x, means["mean"], yerr=means["std"], marker="o", capsize=2, label=comparison)
    if by == "layer":
        layers = unet_order(frame.groupby("layer", sort=False).size().index)
        ax.set_xticks(range(len(layers)), [short_layer_name(name) for name in layers], rotation=60, ha="right",
                      fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mask IoU (mean ± std over pairs)")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def iou_by_layer(overlap: pd.DataFrame) -> plt.Figure:
    return _iou_lines(overlap, "layer", "FeedForward layer", "Subset mask IoU per layer, with controls")


def iou_by_step(overlap: pd.DataFrame) -> plt.Figure:
    return _iou_lines(overlap, "step", "sampling step (0 = noisiest)", "Subset mask IoU per step, with controls")


def iou_vs_subset_size(overlap: pd.DataFrame) -> plt.Figure:
    """`overlap` concatenates several locate runs with a `subset_size` column."""
    frame = overlap.assign(comparison=_comparison(overlap))
    fig, ax = _subplots(figsize=(6, 4))
    for comparison, group in frame.groupby("comparison", sort=False):
        means = group.groupby("subset_size")["iou"].mean()
        ax.plot(means.index, means.to_numpy(), marker="o", label=comparison)
    ax.set_xlabel("prompts per subset (m)")
    ax.set_ylabel("mean mask IoU")
    ax.set_ylim(0, 1)
    ax.set_title("Subset mask IoU vs subset size")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def selected_share_by_layer(masks, timesteps: int = 10) -> plt.Figure:
    """Share of each layer's output weights in the union of steps 0..timesteps-1 (what `prune` would zero)."""
    union = masks.union_indices(min(timesteps, len(masks.steps)))
    shares = {layer: union[layer].numel() / (masks.shapes[layer][0] * masks.shapes[layer][1])
              for layer in unet_order(union)}
    fig, ax = _subplots(figsize=(8, 4))
    ax.bar(range(len(shares)), [100 * s for s in shares.values()])
    ax.set_xticks(range(len(shares)), [short_layer_name(name) for name in shares], rotation=60, ha="right", fontsize=8)
    ax.set_xlabel("FeedForward layer")
    ax.set_ylabel("weights selected (%)")
    ax.set_title("Share of output weights selected per layer "
                 f"(union of steps 0..{min(timesteps, len(masks.steps)) - 1})")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_locate_plots(folder: str | Path, masks, overlap: pd.DataFrame | None, timesteps: int = 10) -> list[Path]:
    """The PNGs `memprune locate` writes into its output folder."""
    folder = Path(folder)
    paths = [save_figure(selected_share_by_layer(masks, timesteps), folder / "selected_share_by_layer.png")]
    if overlap is not None and len(overlap):
        paths.append(save_figure(iou_heatmap(overlap), folder / "iou_heatmap.png"))
        paths.append(save_figure(iou_by_layer(overlap), folder / "iou_by_layer.png"))
        paths.append(save_figure(iou_by_step(overlap), folder / "iou_by_step.png"))
    return paths


def sweep_curves(sweep: pd.DataFrame) -> plt.Figure:
    """Pruning sweep (memprune.sweep): held-out memorization rate and utility vs the share of output weights
    zeroed, the located mask against size-matched random masks, one line per τ."""
    metrics = [m for m in ("memorization_rate", "attribute_accuracy") if m in sweep and sweep[m].notna().any()]
    fig, axes = _subplots(1, len(metrics), figsize=(6 * len(metrics), 4), squeeze=False)
    baseline = sweep[sweep.method == "none"]
    pruned = sweep[sweep.method != "none"]
    for ax, metric in zip(axes[0], metrics, strict=True):
        for (method, tau), group in pruned.groupby(["method", "timesteps"]):
            points = group.groupby("zeroed_share")[metric].mean()
            style = "-o" if method == "wanda" else "--s"
            label = f"{'located (Wanda)' if method == 'wanda' else 'random, same size'}, τ={tau}"
            ax.plot(100 * points.index, 100 * points.to_numpy(), style, label=label)
        if len(baseline):
            ax.axhline(100 * baseline[metric].iloc[0], color="grey", linestyle=":", label="unpruned")
        ax.set_xscale("log")
        ax.set_xticks(sorted(100 * pruned.zeroed_share.unique()))  # one labelled tick per swept size
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels collide on a short log axis
        ax.set_xlabel("FeedForward output weights zeroed (%, log scale)")
        ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_title("Memorization of held-out memorized prompts")
    if len(metrics) > 1:
        axes[0][1].set_title("Utility: attribute accuracy on general captions")
    fig.tight_layout()
    return fig


def image_grid(result, group: str, max_prompts: int = 8):
    """Prompts × seeds of an `EvaluationResult` group as a PIL image (tiles upscaled by whole pixels, so nothing is
    smoothed): one row per prompt (up to max_prompts); the training image when known, then each model's seeds,
    with the copy similarity under each generation (* above the copy threshold)."""
    from PIL import Image, ImageDraw

    from .similarity import tensor_to_pil

    members = result.groups[group].members[:max_prompts]
    models = list(dict.fromkeys(model for model, _ in result.images))
    seeds = next(iter(result.images.values())).shape[1]
    height, width = next(iter(result.images.values())).shape[-2:]
    scale = max(1, math.ceil(64 / max(height, width)))
    cell_h, cell_w = height * scale, width * scale
    show_training = any(result.training_images.get(s, [None] * (i + 1))[i] is not None for s, i in members)
    label_w, header_h, footer_h, gap, block_gap = 180, 16, 12, 2, 10
    columns = ([("training", None, None)] if show_training else []) + [
        (model, model, s) for model in models for s in range(seeds)]
    total_w = label_w + sum(cell_w + gap for _ in columns) + block_gap * len(models)
    total_h = header_h + len(members) * (cell_h + footer_h + gap)
    canvas = Image.new("RGB", (total_w, total_h), "white")
    draw = ImageDraw.Draw(canvas)
    table = result.generations.set_index(["model", "source", "prompt_index", "seed"])
    positions, x = [], label_w
    for index, (_title, model, seed) in enumerate(columns):
        if index > 0 and model != columns[index - 1][1]:
            x += block_gap
        positions.append(x)
        text = "training" if model is None else f"{model} {result.generations.seed.min() + seed}"
        draw.text((x, 2), text, fill="black")
        x += cell_w + gap
    for row, (source, i) in enumerate(members):
        y = header_h + row * (cell_h + footer_h + gap)
        caption = result.sources[source].prompts[i]
        caption = (caption[:28] + ("..." if len(caption) > 28 else "")).encode("latin-1", "replace").decode("latin-1")
        draw.text((4, y + cell_h // 2 - 5), caption, fill="black")
        for (_title, model, seed), x in zip(columns, positions, strict=True):
            if model is None:
                image = result.training_images[source][i]
                if image is None:
                    continue
                footer = ""
            else:
                image = result.images[model, source][i, seed]
                entry = table.loc[(model, source, i, result.generations.seed.min() + seed)]
                value = entry["copy_reference_similarity"]
                footer = "" if not np.isfinite(value) else f"{value:.2f}" + ("*" if value > result.threshold else "")
            tile = tensor_to_pil(image).resize((cell_w, cell_h), Image.Resampling.NEAREST)
            canvas.paste(tile, (x, y))
            if footer:
                draw.text((x + 2, y + cell_h), footer, fill="black")
    return canvas


def copy_similarity_ecdf(result, groups=("memorized_held_out", "memorized")) -> plt.Figure:
    """Empirical CDF of the copy similarity of the memorized generations (the first of `groups` present), one line
    per model (unedited, edited, random control, ...), with the copy threshold and the strict threshold drawn."""
    group = next(g for g in groups if g in result.groups)
    members = set(result.groups[group].members)
    table = result.generations
    table = table[[(s, i) in members for s, i in zip(table.source, table.prompt_index, strict=True)]]
    fig, ax = _subplots(figsize=(7, 4.2))
    for model, rows in table.groupby("model", sort=False):
        values = np.sort(rows.copy_reference_similarity.dropna().to_numpy())
        if values.size:
            ax.step(values, np.arange(1, values.size + 1) / values.size, where="post",
                    label=f"{model} (n={values.size})")
    ax.axvline(result.threshold, color="black", linestyle="--", label=f"copy threshold {result.threshold:.3f}")
    strict = result.threshold_info.get("strict")
    if strict:
        ax.axvline(strict["value"], color="red", linestyle=":", label=f"strict threshold {strict['value']:.3f}")
    ax.set_xlabel("copy similarity to the training image")
    ax.set_ylabel("share of generations ≤ x")
    ax.set_title(f"Copy similarity, {group.replace('_', ' ')} prompts")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig
