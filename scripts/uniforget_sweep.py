"""UniForget on a testbed model: the trade-off of β, gate-training steps and lr against memorization and utility,
beside the Wanda prune (issue: UniForget, `memprune prune --method uniforget`).

For every setting, gates are trained on the neutral prompts only (the testbed's general_heldout.csv; the
memorized captions are checked never to be among them), the closed gates are pruned in memory, and the model is
scored on the memorized captions NOT used by the Wanda locate (memorization rate at the evaluate threshold) and
on held-out general captions (attribute accuracy). The Wanda row locates on the seeded 10-prompt subset (ratio
0.01, τ = 10) and is scored on the same captions; a size-matched random neuron mask is the control for each
UniForget mask.

    python scripts/uniforget_sweep.py --out runs/uniforget_sweep --betas 0.05,0.2,1,5
"""
from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import pandas as pd
import torch

from memprune.commands.defaults import split_testbed_memorized
from memprune.commands.evaluate import with_testbed_defaults
from memprune.evaluation.classifier import load_testbed_classifier
from memprune.evaluation.run import evaluate
from memprune.evaluation.settings import EvaluateSettings
from memprune.generate import GenerationSettings
from memprune.locate import LocateSettings, Locator
from memprune.masks import Masks
from memprune.methods.uniforget import UniForgetSettings, train_gates
from memprune.methods.wanda import SelectionSettings
from memprune.models import DEFAULT_MODEL, load_pipeline
from memprune.prompts import read_prompts
from memprune.prune import apply_masks, undo
from memprune.similarity import make_backend
from memprune.sweep import Scorer


def random_neuron_masks(masks: Masks, seed: int) -> Masks:
    """As many whole columns (neurons) per layer as `masks` prunes, chosen at random; same steps."""
    generator = torch.Generator().manual_seed(seed)
    dense = {}
    for layer in masks.layers:
        rows, cols = masks.shapes[layer]
        pruned_columns = int(masks.dense(layer, masks.steps[0]).any(dim=0).sum())
        columns = torch.zeros(cols, dtype=torch.bool)
        columns[torch.randperm(cols, generator=generator)[:pruned_columns]] = True
        for step in masks.steps:
            dense[layer, step] = columns[None, :].expand(rows, -1).clone()
    return Masks.from_dense(dense, meta={"method": "random_neurons", "seed": seed})


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--betas", default="0.05,0.2,1,2,5")
    parser.add_argument("--train-steps", default="100")
    parser.add_argument("--lrs", default="0.5")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per prompt when scoring")
    parser.add_argument("--general-prompts", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    captions = Path(args.model) / "captions"
    memorized = read_prompts(captions / "memorized.csv")  # all of them: UniForget's neutral prompts must avoid each
    located, held_out = split_testbed_memorized(args.model, args.out)
    used = args.out / "prompts_used.csv"
    neutral = read_prompts(captions / "general_heldout.csv")
    general = neutral.subset(range(len(neutral) - args.general_prompts, len(neutral)))  # scored, not trained on
    train_prompts = neutral.prompts[: len(neutral) - args.general_prompts]

    pipe = load_pipeline(args.model)
    classifier = load_testbed_classifier(args.model)
    generation = GenerationSettings(steps=50, seeds=args.seeds, batch_size=16)
    baseline_settings = with_testbed_defaults(EvaluateSettings(model=args.model, exclude_prompts=str(used),
                                                               generation=generation))
    baseline = evaluate(baseline_settings, pipe=pipe,
                        attribute_classifier=classifier, progress=False)
    scorer = Scorer(held_out=held_out, threshold=baseline.threshold, backend=make_backend("ssim"),
                    generation=generation, general=general, classifier=classifier)
    rows = [{"method": "none", "pruned_neuron_share": 0.0, "seconds": 0.0, **scorer(pipe)}]
    print(rows[-1], flush=True)

    locator = Locator(pipe, LocateSettings(model=args.model, memorized=str(captions / "memorized.csv"),
                                           generation=GenerationSettings(steps=50, batch_size=10)), progress=False)
    tic = time.perf_counter()
    wanda = locator.masks(located.prompts, SelectionSettings(ratio=0.01))
    seconds = time.perf_counter() - tic
    result = apply_masks(pipe, wanda, 10)
    rows.append({"method": "wanda", "ratio": 0.01, "zeroed_weights": result.total_zeroed, "seconds": seconds,
                 **scorer(pipe)})
    undo(pipe, result)
    print(rows[-1], flush=True)

    for beta, steps, lr in itertools.product(floats(args.betas), [int(s) for s in args.train_steps.split(",")],
                                             floats(args.lrs)):
        settings = UniForgetSettings(beta=beta, train_steps=steps, lr=lr, progress=False)
        tic = time.perf_counter()
        gates = train_gates(pipe, train_prompts, settings, memorized_prompts=memorized.prompts)
        seconds = time.perf_counter() - tic
        common = {"beta": beta, "train_steps": steps, "lr": lr, "pruned_neuron_share": gates.pruned_share,
                  "seconds": seconds, "final_mse": float(gates.history.mse.iloc[-1])}
        for method, masks in (("uniforget", gates.masks), ("random_neurons", random_neuron_masks(gates.masks, seed=0))):
            result = apply_masks(pipe, masks, len(masks.steps))
            rows.append({"method": method, **common, "zeroed_weights": result.total_zeroed, **scorer(pipe)})
            undo(pipe, result)
            print(rows[-1], flush=True)
        gates.pruned.assign(beta=beta, train_steps=steps, lr=lr).to_csv(
            args.out / f"pruned_share_beta{beta:g}_steps{steps}_lr{lr:g}.csv", index=False)
        pd.DataFrame(rows).to_csv(args.out / "sweep.csv", index=False)

    table = pd.DataFrame(rows)
    table.to_csv(args.out / "sweep.csv", index=False)
    columns = [c for c in ("method", "beta", "train_steps", "lr", "pruned_neuron_share", "zeroed_weights",
                           "memorization_rate", "copy_similarity", "attribute_accuracy", "seconds") if c in table]
    text = table[columns].round(3).to_string(index=False)
    (args.out / "summary.md").write_text(
        f"# UniForget sweep\n\nmodel `{args.model}`; threshold {baseline.threshold:.3f}; scored on {len(held_out)} "
        f"held-out memorized captions and {len(general)} general captions x {args.seeds} seeds, 50 steps; "
        f"gates trained on {len(train_prompts)} neutral captions\n\n```\n{text}\n```\n\n"
        f"{time.perf_counter() - start:.0f} s\n")
    print(text)
    print(f"done in {time.perf_counter() - start:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
