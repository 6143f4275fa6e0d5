"""Diagnostic on a testbed: which parts of the UNet memorization needs (MODEL_CARD "What was tried").

Zeroes every FeedForward output weight, then 10% / 30% random FF neurons, then every cross-attention value
projection, and scores 20 memorized + 24 general captions (1 seed, DDIM 25) at a fixed copy threshold.

    python scripts/testbed_probes/ff_knockout.py data/testbed
"""
import sys
import time
from pathlib import Path

import torch

from memprune.evaluation.classifier import load_testbed_classifier
from memprune.generate import GenerationSettings
from memprune.models import load_pipeline, output_linears
from memprune.prompts import read_prompts
from memprune.similarity import make_backend
from memprune.sweep import Scorer

torch.set_num_threads(2)
model = sys.argv[1] if len(sys.argv) > 1 else "data/testbed"
pipe = load_pipeline(model)
cap = Path(model) / "captions"
mem = read_prompts(cap / "memorized.csv").subset(range(20))
gen = read_prompts(cap / "general_heldout.csv").subset(range(24))
scorer = Scorer(held_out=mem, threshold=0.334, backend=make_backend("ssim"),
                generation=GenerationSettings(steps=25, seeds=1, batch_size=24), general=gen,
                classifier=load_testbed_classifier(model))
lins = output_linears(pipe.unet)
t = time.time()
print("base", scorer(pipe), time.time() - t, flush=True)
saved = {n: linear.weight.data.clone() for n, linear in lins.items()}
for linear in lins.values():
    linear.weight.data.zero_()
print("all FF out zeroed", scorer(pipe), flush=True)
for n, linear in lins.items():
    linear.weight.data.copy_(saved[n])
# knock out 10% random input columns in every FF
g = torch.Generator().manual_seed(0)
for frac in (0.1, 0.3):
    for linear in lins.values():
        cols = torch.randperm(linear.weight.shape[1], generator=g)[: int(frac * linear.weight.shape[1])]
        linear.weight.data[:, cols] = 0
    print(f"random {frac} neurons", scorer(pipe), flush=True)
    for n, linear in lins.items():
        linear.weight.data.copy_(saved[n])
# cross-attention to_v zeroed -> no text
for n, m in pipe.unet.named_modules():
    if n.endswith("attn2.to_v"):
        m.weight.data.mul_(0.0)
print("attn2.to_v zeroed", scorer(pipe), flush=True)
