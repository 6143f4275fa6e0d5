"""Measure the phenomenon the method relies on, on a testbed model (issue: the embedded default model, point 3).

1. Copy threshold and baseline from `evaluate` on the unedited model (memorized, same-style control, general).
2. Locate with the core (Wanda, weight granularity, both CFG halves, reference "", 50 steps) on a seeded
   10-prompt subset of the memorized captions; prune the union of steps 0..τ-1 for a curve of ratios, and the
   same number of random weights per layer; memorization rate of the OTHER memorized captions and attribute
   accuracy on general captions for each.
3. Subset IoU: N seeded memorized subsets vs the same-style non-memorized control subsets.

    python scripts/testbed_phenomenon.py --model work_testbed/run2/testbed --out runs/phenomenon
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from memprune.commands.defaults import split_testbed_memorized
from memprune.commands.evaluate import with_testbed_defaults
from memprune.evaluation.classifier import load_testbed_classifier
from memprune.evaluation.run import evaluate
from memprune.evaluation.settings import EvaluateSettings
from memprune.generate import GenerationSettings
from memprune.locate import LocateSettings, Locator, subset_masks
from memprune.masks import subset_overlap, summarize_overlap
from memprune.methods.wanda import SelectionSettings
from memprune.models import DEFAULT_MODEL, load_pipeline, resolve_device
from memprune.plots import iou_by_layer, save_figure, sweep_curves
from memprune.prompts import read_prompts
from memprune.similarity import make_backend
from memprune.sweep import Scorer, SweepSettings, pruning_sweep, summarize_sweep


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--sweep-seeds", type=int, default=2)
    parser.add_argument("--ratios", default="0.0025,0.005,0.01,0.02,0.05,0.1")
    parser.add_argument("--taus", default="10")
    parser.add_argument("--random-controls", type=int, default=2)
    parser.add_argument("--subsets", type=int, default=5)
    parser.add_argument("--general-prompts", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--batch-size", type=int, default=16, help="generation batch (larger on a GPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    captions = Path(args.model) / "captions"
    located, held_out = split_testbed_memorized(args.model, args.out)
    used = args.out / "prompts_used.csv"

    pipe = load_pipeline(args.model, resolve_device(args.device))
    classifier = load_testbed_classifier(args.model)
    generation = GenerationSettings(steps=args.steps, seeds=args.seeds, batch_size=args.batch_size)
    baseline_settings = with_testbed_defaults(EvaluateSettings(model=args.model, exclude_prompts=str(used),
                                                               generation=generation))
    baseline = evaluate(baseline_settings, pipe=pipe,
                        attribute_classifier=classifier, progress=True)
    baseline.metrics.to_csv(args.out / "baseline_metrics.csv", index=False)
    print(f"threshold {baseline.threshold:.3f} ({baseline.threshold_info['description']})", flush=True)

    settings = LocateSettings(model=args.model, memorized=str(captions / "memorized.csv"),
                              control=str(captions / "non_memorized_same_style.csv"),
                              generation=GenerationSettings(steps=args.steps, batch_size=max(10, args.batch_size)),
                              subsets=args.subsets)
    locator = Locator(pipe, settings)
    general = read_prompts(captions / "general_heldout.csv")
    general = general.subset(range(min(args.general_prompts, len(general))))
    sweep_generation = GenerationSettings(steps=args.steps, seeds=args.sweep_seeds, batch_size=args.batch_size)
    scorer = Scorer(held_out=held_out, threshold=baseline.threshold, backend=make_backend("ssim"),
                    generation=sweep_generation, general=general, classifier=classifier)
    sweep = pruning_sweep(pipe, lambda ratio: locator.masks(located.prompts, SelectionSettings(ratio=ratio)), scorer,
                          SweepSettings(ratios=tuple(float(r) for r in args.ratios.split(",")),
                                        timesteps=tuple(int(t) for t in args.taus.split(",")),
                                        random_controls=args.random_controls, generation=sweep_generation))
    sweep.to_csv(args.out / "sweep.csv", index=False)
    save_figure(sweep_curves(sweep), args.out / "sweep.png")
    summary = summarize_sweep(sweep)
    print(summary.round(3).to_string(), flush=True)

    overlap = subset_overlap(subset_masks(locator, settings))
    overlap.to_csv(args.out / "overlap.csv", index=False)
    save_figure(iou_by_layer(overlap), args.out / "iou_by_layer.png")
    iou = summarize_overlap(overlap)
    print(iou.round(3).to_string(), flush=True)
    (args.out / "summary.md").write_text(
        f"# Testbed phenomenon\n\nmodel `{args.model}`; {args.steps} steps; threshold {baseline.threshold:.3f}\n\n"
        f"## Sweep (held-out memorized: {len(held_out)} captions x {args.sweep_seeds} seeds)\n\n"
        f"```\n{summary.round(3).to_string()}\n```\n\n## Subset IoU (m=10, {args.subsets} subsets)\n\n"
        f"```\n{iou.round(3).to_string()}\n```\n\n{time.perf_counter() - start:.0f} s\n")
    (args.out / "args.json").write_text(json.dumps(vars(args), default=str, indent=1))
    print(f"done in {time.perf_counter() - start:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
