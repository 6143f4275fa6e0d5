"""Every editing method on the same model, seeds and metrics, in one table.

    python bench/compare_methods.py --out runs/compare_methods            # the embedded testbed, ~1 h on 2 CPU cores
    python bench/compare_methods.py --out runs/cm --quick                 # a smoke run (minutes, numbers meaningless)
    python bench/compare_methods.py --out runs/compare_methods --publish  # also write data/testbed/comparison/

Each arm is built with the memprune command line, exactly as a user would, and timed (wall clock of its commands,
model loading included): Wanda at ratio 0.1 (the testbed's working ratio) and 0.01 (the paper's), a random mask
with the same number of weights per layer as Wanda 0.1 (the control), NeMo, UniForget, the fine-tunes (gradient
projection, DoCo, and plain fine-tuning on the same retain data as their step-matched control) and Wen's
inference-time mitigation. Then ONE `memprune evaluate --compare ...` scores all of them with the same seeds and
one copy threshold (the held-out memorized captions are those outside the 10 every locate used), ONE
`memprune attack` re-attacks every model with an optimised prompt embedding, and memprune.compare joins the
three into comparison.csv (one row per model, group and metric) and comparison.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from memprune.compare import comparison_markdown, comparison_metrics, comparison_table  # noqa: E402
from memprune.models import DEFAULT_MODEL  # noqa: E402
from memprune.prompts import read_prompts  # noqa: E402


@dataclass
class Arm:
    name: str  # the model's column name (its folder name under models/)
    label: str  # its row in the table
    kind: str  # weight_edit, mitigation or finetune
    commands: list = field(default_factory=list)  # memprune argv lists (or callables) that build models/NAME


def memprune(*args) -> list[str]:
    return [sys.executable, "-m", "memprune", *map(str, args)]


def random_control_masks(masks_folder: Path, out: Path, timesteps: int, seed: int = 0) -> None:
    """The control: as many random weights per layer as the union of the located masks over steps 0..τ-1."""
    from memprune.masks import Masks, random_masks_like

    located = Masks.load(masks_folder)
    control = random_masks_like(located, timesteps, seed=seed)
    control.meta = {**located.meta, "selection": {"method": "random", "like": str(masks_folder), "seed": seed}}
    out.mkdir(parents=True, exist_ok=True)
    control.save(out)


def build_arms(args, work: Path) -> list[Arm]:
    located, models = work / "locate", work / "models"
    steps, tau, sample = args.steps, args.timesteps, ["--num-prompts", args.locate_prompts, "--sample-seed", 0]
    locate = lambda name, *extra: memprune("locate", "--model", args.model, *sample, "--steps", steps,  # noqa: E731
                                          *extra, "--out", located / name, "--overwrite")
    prune = lambda name, masks: memprune("prune", "--model", args.model, "--masks", masks,  # noqa: E731
                                         "--timesteps", tau, "--out", models / name, "--overwrite")
    finetune = lambda name, method: memprune("finetune", "--model", args.model, "--method", method,  # noqa: E731
                                             "--steps", args.finetune_steps, "--out", models / name, "--overwrite")
    arms = [
        Arm("wanda_0.1", "Wanda, ratio 0.1", "weight_edit",
            [locate("wanda_0.1", "--ratio", 0.1), prune("wanda_0.1", located / "wanda_0.1")]),
        Arm("wanda_0.01", "Wanda, ratio 0.01 (paper)", "weight_edit",
            [locate("wanda_0.01", "--ratio", 0.01), prune("wanda_0.01", located / "wanda_0.01")]),
        Arm("random_0.1", "random mask, size of Wanda 0.1 (control)", "weight_edit",
            [lambda: random_control_masks(located / "wanda_0.1", located / "random_0.1", tau),
             prune("random_0.1", located / "random_0.1")]),
        Arm("nemo", "NeMo", "weight_edit",
            [locate("nemo", "--method", "nemo"), prune("nemo", located / "nemo")]),
        Arm("uniforget", "UniForget (β 5, 50 gate steps)", "weight_edit",
            [memprune("prune", "--model", args.model, "--method", "uniforget", "--beta", 5, "--train-steps",
                      args.uniforget_steps, "--timesteps", tau, "--masks-out", located / "uniforget",
                      "--out", models / "uniforget", "--overwrite")]),
        Arm("gradproj", "gradient projection fine-tune", "finetune", [finetune("gradproj", "gradproj")]),
        Arm("doco", "DoCo fine-tune", "finetune", [finetune("doco", "doco")]),
        Arm("plain_finetune", "plain fine-tune, same data and steps (control)", "finetune",
            [finetune("plain_finetune", "plain")]),
        Arm("wen", "Wen et al. mitigation", "mitigation", []),  # no folder: a column of evaluate --mitigation wen
    ]
    wanted = set(args.arms.split(",")) if args.arms else None
    return [arm for arm in arms if wanted is None or arm.name in wanted]


def run(command, env, log) -> float:
    """Run one step (a memprune command or a function); its wall-clock seconds."""
    tic = time.perf_counter()
    if callable(command):
        command()
    else:
        printable = " ".join(str(c) for c in command[1:])
        print(f"$ python {printable}", flush=True)
        log.write(f"$ python {printable}\n")
        log.flush()
        result = subprocess.run(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if result.returncode:
            raise SystemExit(f"Step failed (exit {result.returncode}): {printable}; see {log.name}")
    return time.perf_counter() - tic


def timing_prompts(args, work: Path) -> tuple[Path, Path]:
    """Small prompt files for the timing run: the first memorized captions and as many same-style controls."""
    from memprune.commands.defaults import testbed_captions

    captions = testbed_captions(args.model)
    folder = work / "timing_prompts"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name in ("memorized.csv", "non_memorized_same_style.csv"):
        prompts = read_prompts(captions / name)  # resolves the image paths
        count = min(args.timing_prompts, len(prompts))
        frame = pd.DataFrame({"caption": prompts.prompts[:count], "image": prompts.images[:count]})
        frame.to_csv(folder / name, index=False)
        files.append(folder / name)
    return files[0], files[1]


def timing_run(args, work: Path, folders: list[Path], mitigation: list, env, log) -> None:
    """seconds_per_image_ratio of every model in one short evaluate run of its own, with nothing else scored, so it can
    be run when the machine is otherwise idle (the long evaluate's timings drift with whatever else the machine
    does)."""
    memorized, control = timing_prompts(args, work)
    compare = [x for folder in folders for x in ("--compare", folder)]
    if mitigation:  # Wen's target as the long evaluate calibrated it, so the timed mitigation does the same work
        metrics = pd.read_csv(work / "evaluate" / "metrics.csv")
        target = metrics[metrics.metric == "mitigation_target"].value
        mitigation = [*mitigation, "--wen-target", float(target.iloc[0])] if len(target) else mitigation
    run(memprune("evaluate", "--model", args.model, *compare, *mitigation, "--memorized", memorized, "--reference",
                 control, "--control", "none", "--general", "none", "--no-attributes", "--grid-prompts", 0,
                 "--seeds", 1, "--steps", args.steps, "--no-random-control", "--out", work / "timing", "--overwrite"),
        env, log)


def with_timing(evaluation: pd.DataFrame, timing: pd.DataFrame) -> pd.DataFrame:
    """evaluate's metrics with seconds_per_image(_ratio) of the memorized group taken from the timing run."""
    timed = timing[(timing.group == "memorized") & timing.metric.str.startswith("seconds_per_image")]
    keep = ~((evaluation.group == "memorized") & evaluation.metric.str.startswith("seconds_per_image"))
    return pd.concat([evaluation[keep], timed[["model", "group", "metric", "value"]]], ignore_index=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--arms", default=None, help="comma-separated arm names (default: all)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps of locate, evaluate and attack")
    parser.add_argument("--seeds", type=int, default=2, help="evaluate seeds per prompt")
    parser.add_argument("--timesteps", type=int, default=10, help="τ of every prune")
    parser.add_argument("--locate-prompts", type=int, default=10)
    parser.add_argument("--uniforget-steps", type=int, default=50)
    parser.add_argument("--finetune-steps", type=int, default=None, help="(default: memprune finetune's)")
    parser.add_argument("--attack-prompts", type=int, default=10, help="held-out memorized captions attacked")
    parser.add_argument("--timing-prompts", type=int, default=16,
                        help="memorized (and control) captions of the timing run")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every step")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 steps, 1 seed, tiny budgets")
    parser.add_argument("--timing-only", action="store_true",
                        help="only (re)run the timing evaluate and the table, on the models of an earlier run in --out")
    parser.add_argument("--publish", action="store_true", help="copy comparison.{csv,md} to data/testbed/comparison/")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.uniforget_steps, args.attack_prompts, args.timing_prompts = 4, 1, 2, 2, 2
        args.finetune_steps = args.finetune_steps or 2
        args.timesteps = min(args.timesteps, args.steps)  # τ cannot exceed the recorded steps
    if args.finetune_steps is None:
        args.finetune_steps = 200
    work = args.out
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    arms = build_arms(args, work)
    seconds_file = work / "edit_seconds.json"
    edit_seconds: dict[str, float] = json.loads(seconds_file.read_text()) if args.timing_only else {}
    start = time.perf_counter()
    folders = [work / "models" / arm.name for arm in arms if arm.commands]
    mitigation = ["--mitigation", "wen"] if any(arm.kind == "mitigation" for arm in arms) else []
    with open(work / "commands.log", "a") as log:
        if not args.timing_only:
            for arm in arms:
                if arm.commands:
                    edit_seconds[arm.name] = sum(run(command, env, log) for command in arm.commands)
                    print(f"{arm.name}: built in {edit_seconds[arm.name]:.0f} s", flush=True)
            # the memorized captions every locate used (one seeded sample): the rest are the held-out group
            used = [work / "locate" / arm.name / "prompts_used.csv" for arm in arms]
            held_out = next((path for path in used if path.is_file()), None)
            compare = [x for folder in folders for x in ("--compare", folder)]
            exclude = ["--exclude-prompts", held_out] if held_out else []
            edit_seconds["unedited"] = 0.0
            if mitigation:
                edit_seconds["wen"] = 0.0  # nothing to build: its cost is per image (seconds_per_image_ratio)
            seconds_file.write_text(json.dumps(edit_seconds, indent=1))
            run(memprune("evaluate", "--model", args.model, *compare, *mitigation, *exclude, "--seeds", args.seeds,
                         "--steps", args.steps, "--no-random-control", "--out", work / "evaluate", "--overwrite"),
                env, log)
            attack_edited = [x for folder in folders for x in ("--edited", folder)]
            # evaluate's copy threshold exactly (same backend), so attacked and unattacked rates share one threshold
            run(memprune("attack", "--model", args.model, *attack_edited, *exclude,
                         "--num-prompts", args.attack_prompts,
                         "--steps", args.steps, "--threshold-from", work / "evaluate", "--out", work / "attack",
                         "--overwrite"), env, log)
        timing_run(args, work, folders, mitigation, env, log)
    evaluation = with_timing(pd.read_csv(work / "evaluate" / "metrics.csv"),
                             pd.read_csv(work / "timing" / "metrics.csv"))
    attack = pd.read_csv(work / "attack" / "metrics.csv")
    metrics = comparison_metrics(evaluation, attack, edit_seconds)
    metrics.to_csv(work / "comparison.csv", index=False)
    labels = {"unedited": "unedited", **{arm.name: arm.label for arm in arms}}
    table = comparison_table(metrics, ["unedited", *[arm.name for arm in arms]], labels)
    header = (f"Embedded testbed `{Path(args.model).name}`; {args.steps} sampling steps, {args.seeds} evaluate seeds, "
              f"τ {args.timesteps}, located on {args.locate_prompts} memorized captions, attack on "
              f"{args.attack_prompts} held-out captions; {args.threads} CPU threads; seconds per image from a separate "
              f"timing run ({args.timing_prompts} memorized captions, 1 seed, all models alternating); this invocation "
              f"{time.perf_counter() - start:.0f} s.\n\n")
    (work / "comparison.md").write_text(header + comparison_markdown(table))
    (work / "comparison_settings.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=1))
    print(header + comparison_markdown(table))
    if args.publish:
        target = ROOT / "data" / "testbed" / "comparison"
        target.mkdir(parents=True, exist_ok=True)
        for name in ("comparison.csv", "comparison.md", "comparison_settings.json"):
            shutil.copy(work / name, target / name)
        print(f"published to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
