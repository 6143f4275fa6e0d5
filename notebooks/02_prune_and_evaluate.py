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
# # Locate on 10 memorized prompts, prune, evaluate on the others — before/after, and a sparsity sweep
#
# The claim under test (Chavhan et al. 2024): a mask located with Wanda on a *small* set of memorized prompts
# (10, against the empty prompt, first 10 of 50 steps) removes memorization of the *other* memorized prompts
# too, at ~1% sparsity on SD v1.4, while leaving general generation intact. On the testbed the before/after uses
# ratio 0.1, the smallest at which a located mask beats a random one there (the sweep below shows 0.01 too). The control is a random mask of the same size
# per layer. Everything runs on the embedded testbed (`data/testbed`), whose training images are known.
#
# Executed by `make notebooks`; CI runs it with `MEMPRUNE_QUICK=1` (small settings, numbers not meaningful).
# The sweep here is kept small so the notebook runs in minutes on 2 CPU cores; the full curve (more ratios,
# seeds and random controls) is `scripts/testbed_phenomenon.py`, reported in data/testbed/MODEL_CARD.md.

# %% tags=["parameters"]
import os

QUICK = os.environ.get("MEMPRUNE_QUICK") == "1"
LOCATE_STEPS = 10 if QUICK else 50       # sampling steps while recording
EVAL_STEPS = 10 if QUICK else 50         # sampling steps while evaluating
EVAL_SEEDS = 1 if QUICK else 2           # seeds per prompt in the before/after evaluation (demo: 4)
SWEEP_SEEDS = 1                          # seeds per prompt in each sweep point
# The method's ratio is 0.01; on the testbed the smallest that localizes is 0.05-0.1 (model card, section 3).
RATIO, TAU = 0.1, 10
SWEEP_RATIOS = (0.01, 0.1)
# The same sweep in the paper's units: columns kept per output row. Ratio 0.01 keeps k = 12-51 on SD1.5
# (H = 1280-5120) but only 2-5 on the testbed (H = 256-512); these k put the testbed on SD's scale.
SWEEP_K = (5,) if QUICK else (12, 25, 51)
SWEEP_TAUS = (1, TAU)                    # τ: steps whose masks are united
RANDOM_CONTROLS = 1
GENERAL_PROMPTS = 8 if QUICK else 24     # held-out general captions for utility (sweep and before/after)

# %%
# %matplotlib inline
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
import tempfile
from pathlib import Path

import pandas as pd
import torch
from IPython.display import Markdown, display

from memprune.commands.evaluate import with_testbed_defaults
from memprune.evaluation.classifier import load_testbed_classifier
from memprune.evaluation.report import metrics_markdown
from memprune.evaluation.run import evaluate
from memprune.evaluation.settings import EvaluateSettings
from memprune.generate import GenerationSettings
from memprune.locate import LocateSettings, Locator
from memprune.models import DEFAULT_MODEL, load_pipeline
from memprune.plots import copy_similarity_ecdf, image_grid, selected_share_by_layer, sweep_curves
from memprune.prompts import read_prompts, split_located
from memprune.prune import apply_masks
from memprune.methods.wanda import SelectionSettings
from memprune.similarity import make_backend
from memprune.sweep import Scorer, SweepSettings, pruning_sweep, summarize_sweep

# torch uses its default thread count (OMP_NUM_THREADS): forcing 2 threads on a busy 2-core machine stalls
captions = Path(DEFAULT_MODEL) / "captions"
memorized = read_prompts(captions / "memorized.csv")
located, held_out = split_located(memorized, 10, seed=0)
print(f"locate on {len(located)} memorized captions, evaluate on the other {len(held_out)}:", located.prompts)

# %% [markdown]
# ## 1. Locate (Wanda, weight granularity, both CFG halves, reference = the empty prompt)

# %%
pipe = load_pipeline(DEFAULT_MODEL)
settings = LocateSettings(model=DEFAULT_MODEL, memorized=str(captions / "memorized.csv"),
                          generation=GenerationSettings(steps=LOCATE_STEPS, batch_size=10),
                          selection=SelectionSettings(ratio=RATIO))
locator = Locator(pipe, settings, progress=False)
masks = locator.masks(located.prompts)
selected_share_by_layer(masks, TAU)

# %% [markdown]
# ## 2. Prune the union of steps 0..τ−1 and evaluate: unedited, edited, and a random mask of the same size
# Groups: `memorized_held_out` (memorized captions outside the 10 used to locate — the claim is about these),
# `same_style_control` (emoji seen once in training), `general` (held-out captions of the procedural shapes).
# Beside the edit, evaluate scores its control: the unedited model with as many weights zeroed at random per
# tensor (`random_control`). Two copy thresholds: the usual one (controls vs the *nearest* known training image)
# and a strict one (controls vs their *own* training image), under which damaged copies still count.

# %%
edited = load_pipeline(DEFAULT_MODEL)
edit = apply_masks(edited, masks, TAU)
print(f"zeroed {edit.total_zeroed} weights in {len(edit.zeroed)} layers")
used = Path(tempfile.mkdtemp()) / "prompts_used.csv"
pd.DataFrame({"caption": located.prompts}).to_csv(used, index=False)
classifier = load_testbed_classifier(DEFAULT_MODEL)
general_file = used.parent / "general.csv"  # the first GENERAL_PROMPTS held-out general captions keep this quick
pd.read_csv(captions / "general_heldout.csv").head(GENERAL_PROMPTS).to_csv(general_file, index=False)
eval_settings = with_testbed_defaults(EvaluateSettings(
    exclude_prompts=str(used), general=str(general_file),
    generation=GenerationSettings(steps=EVAL_STEPS, seeds=EVAL_SEEDS, batch_size=16)))
evaluation = evaluate(eval_settings, pipe=pipe, edited_pipe=edited, attribute_classifier=classifier, progress=False)
display(Markdown(metrics_markdown(evaluation, eval_settings)))

# %%
before_after = evaluation.metrics.pivot_table(index=["group", "metric"], columns="model", values="value", sort=False)
key_rows = [("memorized_held_out", "memorization_rate"), ("memorized_held_out", "memorization_rate_strict"),
            ("same_style_control", "memorization_rate"), ("same_style_control", "similarity_to_unedited"),
            ("general", "attribute_accuracy"), ("memorized", "seconds_per_image")]
display(before_after.loc[[k for k in key_rows if k in before_after.index]].round(3))
value = lambda group, metric, model: before_after.loc[(group, metric), model]  # noqa: E731
display(Markdown(
    f"**Reading.** Held-out memorized captions are copied in "
    f"{value('memorized_held_out', 'memorization_rate', 'unedited'):.1%} of generations before pruning, "
    f"{value('memorized_held_out', 'memorization_rate', 'edited'):.1%} after, and "
    f"{value('memorized_held_out', 'memorization_rate', 'random_control'):.1%} after the random mask of the same "
    f"size; under the strict threshold {value('memorized_held_out', 'memorization_rate_strict', 'unedited'):.1%} → "
    f"{value('memorized_held_out', 'memorization_rate_strict', 'edited'):.1%} (random "
    f"{value('memorized_held_out', 'memorization_rate_strict', 'random_control'):.1%}). Same-style controls' "
    f"similarity to the unedited model: edit {value('same_style_control', 'similarity_to_unedited', 'edited'):.3f}, "
    f"random {value('same_style_control', 'similarity_to_unedited', 'random_control'):.3f}; same-style control "
    f"{value('same_style_control', 'memorization_rate', 'unedited'):.1%} → "
    f"{value('same_style_control', 'memorization_rate', 'edited'):.1%}; general attribute accuracy "
    f"{value('general', 'attribute_accuracy', 'unedited'):.1%} → {value('general', 'attribute_accuracy', 'edited'):.1%}."))

# %% [markdown]
# The whole distribution of copy similarity on the held-out memorized captions, per model, with both thresholds:
# a rate is the share of a curve to the right of a threshold.

# %%
copy_similarity_ecdf(evaluation)

# %% [markdown]
# Image grids: each row is a prompt; the training image, then the unedited model's seeds, then the edited
# model's. The number under a tile is its similarity to the training image (* = above the copy threshold).

# %%
image_grid(evaluation, "memorized_held_out", max_prompts=8)

# %%
image_grid(evaluation, "general", max_prompts=6)

# %% [markdown]
# ## 3. Sweep of the ratio (and of k per row, the paper's units) and τ against size-matched random masks
# Each point prunes in place, scores, and restores the weights. Memorization is measured on the held-out
# memorized captions with the copy threshold calibrated above; utility on held-out general captions.
# `k_min`..`k_max` are the columns kept per output row over layers, so ratio and k points read in one unit.

# %%
general = read_prompts(captions / "general_heldout.csv")
general = general.subset(range(min(GENERAL_PROMPTS, len(general))))
sweep_generation = GenerationSettings(steps=EVAL_STEPS, seeds=SWEEP_SEEDS, batch_size=16)
scorer = Scorer(held_out=held_out, threshold=evaluation.threshold, backend=make_backend("ssim"),
                generation=sweep_generation, general=general, classifier=classifier)
sweep = pruning_sweep(pipe, lambda ratio: locator.masks(located.prompts, SelectionSettings(ratio=ratio)), scorer,
                      SweepSettings(ratios=SWEEP_RATIOS, k_per_row=SWEEP_K, timesteps=SWEEP_TAUS,
                                    random_controls=RANDOM_CONTROLS, generation=sweep_generation), progress=False,
                      masks_for_k=lambda k: locator.masks(located.prompts, SelectionSettings(ratio=None, k_per_row=k)))
sweep_summary = summarize_sweep(sweep)
display(sweep_summary.round(3))
baseline_rate = sweep.query("method == 'none'").memorization_rate.iloc[0]
display(Markdown(f"**Reading.** Unpruned held-out memorization rate {baseline_rate:.1%}. " + " ".join(
    f"{f'Ratio {ratio:g}' if ratio == ratio else f'k = {k:g} per row'} (k = {k_min:g}..{k_max:g}, τ={tau}, "
    f"{row['zeroed_share (wanda)']:.1%} of FeedForward weights zeroed): located "
    f"{row['memorization_rate (wanda)']:.1%} vs random {row['memorization_rate (random)']:.1%}, attribute accuracy "
    f"{row['attribute_accuracy (wanda)']:.1%} vs {row['attribute_accuracy (random)']:.1%}."
    for (ratio, k, k_min, k_max, tau), row in sweep_summary.iterrows())))
sweep_curves(sweep)
