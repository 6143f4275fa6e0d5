"""Diagnostic on a testbed: does ANY selection (Wanda or z-score neurons, reference "" or the same-style
control captions) located on 10 memorized captions lower memorization of 20 others more than a random mask?

    python scripts/testbed_probes/locate_variants.py data/testbed
"""
import sys
from pathlib import Path

import torch

from memprune.evaluation.classifier import load_testbed_classifier
from memprune.generate import GenerationSettings
from memprune.locate import LocateSettings, Locator
from memprune.masks import random_masks_like
from memprune.methods.wanda import SelectionSettings
from memprune.models import load_pipeline
from memprune.prompts import read_prompts
from memprune.prune import apply_masks, undo
from memprune.similarity import make_backend
from memprune.sweep import Scorer

torch.set_num_threads(2)
model = sys.argv[1] if len(sys.argv) > 1 else "data/testbed"
steps = 25
pipe = load_pipeline(model)
cap = Path(model) / "captions"
mem_all = read_prompts(cap / "memorized.csv")
located = mem_all.subset(range(10))
held = mem_all.subset(range(10, 30))
gen = read_prompts(cap / "general_heldout.csv").subset(range(24))
scorer = Scorer(held_out=held, threshold=0.334, backend=make_backend("ssim"),
                generation=GenerationSettings(steps=steps, seeds=1, batch_size=24), general=gen,
                classifier=load_testbed_classifier(model))
print("base", scorer(pipe), flush=True)
for ref in ("empty", str(cap / "non_memorized_same_style.csv")):
    loc = Locator(pipe, LocateSettings(model=model, memorized=str(cap / "memorized.csv"), reference=ref,
                                       generation=GenerationSettings(steps=steps, batch_size=10)))
    for gran, ratios in (("weight", (0.01, 0.05)), ("neuron", (0.01, 0.05, 0.1))):
        for r in ratios:
            m = loc.masks(located.prompts, SelectionSettings(ratio=r, granularity=gran))
            res = apply_masks(pipe, m, 10)
            s = scorer(pipe)
            undo(pipe, res)
            rnd = random_masks_like(m, 10, seed=0)
            res = apply_masks(pipe, rnd, 10)
            s2 = scorer(pipe)
            undo(pipe, res)
            print(Path(ref).name, gran, r, "located", {k: round(v, 3) for k, v in s.items()},
                  "random", {k: round(v, 3) for k, v in s2.items()}, flush=True)
