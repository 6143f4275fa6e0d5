# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Do memorized images share neurons? Subset overlap on the embedded testbed
#
# Chavhan et al. 2024 claim that the FeedForward weights selected by Wanda for one small set of memorized
# prompts are largely the same as those selected for another, disjoint-ish set — memorized images share a
# subspace. Here we locate masks for several seeded subsets of the testbed's memorized captions and compare
# them with mask IoU, **always beside two controls**: memorized vs non-memorized subsets, and non-memorized vs
# non-memorized subsets (same-style captions the model saw once). Overlap has a floor that does not come from
# memorization at all (|W| alone drives part of the Wanda score), so only the gap to the controls means something.
#
# Executed by `make notebooks` (`scripts/run_notebooks.py`); CI runs it with `MEMPRUNE_QUICK=1` (small settings).

# %% tags=["parameters"]
import os

QUICK = os.environ.get("MEMPRUNE_QUICK") == "1"
STEPS = 10 if QUICK else 50          # sampling steps per generation (the method uses the first 10 of 50)
N_SUBSETS = 3 if QUICK else 5        # seeded subsets per group
SUBSET_SIZE = 10                     # prompts per subset (m)
SUBSET_SIZES = [5, 10] if QUICK else [5, 10, 20]
RATIO = 0.01                         # Wanda: share of columns kept per output row

# %%
# %matplotlib inline
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
import torch
import pandas as pd
from IPython.display import Markdown, display

from memprune.generate import GenerationSettings
from dataclasses import replace

from memprune.locate import LocateSettings, Locator, subset_masks
from memprune.masks import subset_overlap, summarize_overlap
from memprune.models import DEFAULT_MODEL, load_pipeline
from memprune.plots import iou_by_layer, iou_by_step, iou_heatmap, iou_vs_subset_size
from memprune.methods.wanda import SelectionSettings

# torch uses its default thread count (OMP_NUM_THREADS): forcing 2 threads on a busy 2-core machine stalls
captions = f"{DEFAULT_MODEL}/captions"
pipe = load_pipeline(DEFAULT_MODEL)
settings = LocateSettings(
    model=DEFAULT_MODEL,
    memorized=f"{captions}/memorized.csv",
    control=f"{captions}/non_memorized_same_style.csv",
    generation=GenerationSettings(steps=STEPS, batch_size=10),
    selection=SelectionSettings(ratio=RATIO),
    subsets=N_SUBSETS,
    subset_size=SUBSET_SIZE,
)
locator = Locator(pipe, settings, progress=False)  # caches statistics: every re-selection below costs no generation
print(f"{len(locator.weights)} FeedForward layers; {STEPS} steps; {N_SUBSETS} subsets of {SUBSET_SIZE} per group")

# %% [markdown]
# ## 1. Memorized subsets vs the controls (Wanda, weight granularity, both CFG halves)

# %%
overlap = subset_overlap(subset_masks(locator, settings))
summary = summarize_overlap(overlap)
display(summary.round(3))
mem = summary.loc["memorized vs memorized", "mean_iou"]
controls = summary.drop("memorized vs memorized")["mean_iou"]
display(Markdown(
    f"**Reading.** Mean mask IoU of two memorized subsets: **{mem:.3f}**; controls: "
    + ", ".join(f"{k} **{v:.3f}**" for k, v in controls.items())
    + (". Memorized subsets share more weights than either control (by "
       f"{mem - controls.max():.3f} over the closer one)." if mem > controls.max() else
       ". Memorized subsets do **not** share more weights than the controls on this model: the selection is "
       "not specific to memorization here.")))

# %%
iou_heatmap(overlap)

# %%
iou_by_layer(overlap)

# %%
iou_by_step(overlap)

# %% [markdown]
# The heatmap shows, per layer and step, how much two memorized subsets agree; the line plots put the controls
# in the same axes. The printed numbers above are the ones to quote: the claim holds on this model only as far
# as memorized-vs-memorized IoU stands above both controls.

# %% [markdown]
# ## 2. How overlap changes with the subset size m

# %%
frames = []
for size in SUBSET_SIZES:
    sized = replace(settings, subset_size=size)
    frames.append(subset_overlap(subset_masks(locator, sized)).assign(subset_size=size))  # cached stats reused
by_size = pd.concat(frames, ignore_index=True)
size_table = (by_size.assign(comparison=by_size.group_a + " vs " + by_size.group_b)
              .pivot_table(index="subset_size", columns="comparison", values="iou", aggfunc="mean"))
display(size_table.round(3))
display(Markdown("**Reading.** Mean IoU by subset size m: " + "; ".join(
    f"m={m}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()) for m, row in size_table.iterrows())
    + ". Larger subsets select more stable masks for every group; the gap between memorized and the controls "
      "is what carries the claim."))
iou_vs_subset_size(by_size)

# %% [markdown]
# ## 3. Neuron granularity (z-scores, NeMo-style) vs weight granularity (Wanda)
# The same recorded statistics, selected a second way: whole columns (neurons) by z-score of the
# token-averaged activation against the reference, top 1% per layer.

# %%
neuron_overlap = subset_overlap(subset_masks(locator, settings, SelectionSettings(ratio=RATIO, granularity="neuron")))
comparison = pd.concat({"weight (Wanda)": summary["mean_iou"], "neuron (z-score)": summarize_overlap(neuron_overlap)["mean_iou"]},
                       axis=1)
display(comparison.round(3))
display(Markdown("**Reading.** Memorized-vs-memorized IoU is "
                 f"{comparison.loc['memorized vs memorized', 'weight (Wanda)']:.3f} with Wanda weights and "
                 f"{comparison.loc['memorized vs memorized', 'neuron (z-score)']:.3f} with z-score neurons; the "
                 "controls in the same table say how much of either is specific to memorization."))
iou_by_layer(neuron_overlap)
