"""Every editing method on the same model, seeds and metrics, in one table: `memprune benchmark --preset testbed`.

    python bench/compare_methods.py --out runs/compare_methods --threads 1 --processes 2   # testbed: 68 min, 2 cores
    python bench/compare_methods.py --out runs/cm --quick                 # a smoke run (minutes, numbers meaningless)
    python bench/compare_methods.py --out runs/compare_methods --publish  # also write data/testbed/comparison/
    python bench/compare_methods.py --out runs/compare_methods --resume   # continue a killed run

The arms are the preset memprune/benchmark_presets/testbed.toml: Wanda at ratio 0.1 (the testbed's working ratio)
beside its size-matched random control, robust-wanda grown from that Wanda arm's masks (K = 2) beside a random
control of its own size, Wanda at 0.01 (the paper's), NeMo (union scenario) beside a random control of its size,
UniForget, the fine-tunes (gradient projection, DoCo, plain fine-tuning on the same retain data as their
step-matched control, and DoRI's adversarial fine-tuning) and Wen's mitigation. After the benchmark this script runs
NeMo's own per-prompt scenario (evaluate --mitigation nemo_prompt on the located prompts; one evaluate holds one
mitigation, and Wen's is in the benchmark's). `memprune benchmark` builds each with memprune's commands, runs
ONE evaluate over all of them (same seeds, one copy threshold; the held-out memorized captions are those outside
the 10 every locate used) and ONE attack, and joins them into comparison.csv, comparison.md and comparison.png.

This script only adapts the preset to its options (--quick, --steps, ... rewrite the arms' settings into a copy of
the preset) and runs the command; seconds per image come from the benchmark's one evaluate (the separate timing
run this script used to make is gone). The random control of Wanda 0.1 is now memprune.control's (as many random
non-zero weights per tensor, drawn per tensor), not a random masks file of the same size: the same kind of
control, another draw, so its row differs from the table published before by that draw.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from memprune import methods  # noqa: E402
from memprune.benchmark.arms import tomllib  # noqa: E402
from memprune.commands.defaults import benchmark_preset  # noqa: E402
from memprune.models import DEFAULT_MODEL  # noqa: E402
from memprune.prompts import read_prompts  # noqa: E402

PUBLISHED = ("comparison.csv", "comparison.md", "comparison.png", "arms.toml")
NEMO_PER_PROMPT = "nemo_per_prompt"  # OUT/nemo_per_prompt: NeMo's own scenario, published as nemo_per_prompt.{csv,md}


def located_memorized_file(model: str | Path, located: Path, out: Path) -> Path:
    """The model's memorized captions (with their training images, as absolute paths) that a locate used: NeMo's
    per-prompt scenario is scored on the prompts whose neurons were found, not on held-out ones."""
    import pandas as pd

    memorized = read_prompts(Path(model) / "captions" / "memorized.csv")  # resolves each image as evaluate does
    used = set(read_prompts(located / "prompts_used.csv").prompts)
    located_rows = memorized.subset([i for i, caption in enumerate(memorized.prompts) if caption in used])
    images = [located_rows.image(i) for i in range(len(located_rows))]  # refuses a row without its image
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"caption": located_rows.prompts, "image": images}).to_csv(out / "located_memorized.csv", index=False)
    return out / "located_memorized.csv"


def nemo_per_prompt_command(args, memorized: Path) -> list:
    """evaluate with each located prompt generated with its own NeMo neurons blocked (--mitigation nemo_prompt),
    the unedited model beside it on the same seeds; one evaluate cannot hold it and Wen, so it runs on its own."""
    return [sys.executable, "-m", "memprune", "evaluate", "--model", args.model, "--mitigation", "nemo_prompt",
            "--nemo-neurons", args.out / "masks" / "nemo", "--memorized", memorized, "--no-random-control",
            "--steps", args.steps, "--seeds", args.seeds, "--processes", args.processes,
            "--out", args.out / NEMO_PER_PROMPT, "--overwrite"]


def run_nemo_per_prompt(args, env: dict) -> int:
    """NeMo's per-prompt scenario after a benchmark with a nemo arm (skipped when it already finished)."""
    folder = args.out / NEMO_PER_PROMPT
    if not (args.out / "masks" / "nemo" / "masks.json").is_file() or (folder / "metrics.csv").is_file():
        return 0
    memorized = located_memorized_file(args.model, args.out / "masks" / "nemo", args.out / "nemo_per_prompt_input")
    command = nemo_per_prompt_command(args, memorized)
    print("$ memprune " + " ".join(str(c) for c in command[3:]), flush=True)
    return subprocess.run([str(c) for c in command], env=env, cwd=ROOT).returncode


def adapted_arms(args) -> dict[str, dict]:
    """The preset's arms with this script's settings: locate steps, sample and τ, UniForget's and the fine-tunes'
    optimiser steps, the attack steps of robust-wanda and adversarial (--attack-steps); only the arms named by --arms
    and the arms they are built from (masks_from, from)."""
    arms = tomllib.loads(benchmark_preset("testbed")[0])["arms"]
    wanted = set(args.arms.split(",")) if args.arms else set(arms)
    unknown = wanted - set(arms)
    if unknown:
        raise SystemExit(f"Unknown arm {sorted(unknown)[0]!r}: the preset's arms are {', '.join(arms)}.")
    for name in reversed(list(arms)):  # sources are defined above the arms built from them
        if name in wanted:
            wanted |= {arms[name][key] for key in ("masks_from", "from") if key in arms[name]}
    adapted = {}
    for name, table in arms.items():
        if name not in wanted:
            continue
        module = methods.get(table["method"])
        kind, stage = module.METHOD.kind, module.METHOD.stage
        if kind == "weight_edit":
            table["timesteps"] = args.timesteps
        if kind == "weight_edit" and stage == "locate":
            table.update(steps=args.steps, num_prompts=args.locate_prompts)
        elif table["method"] == "uniforget":
            table["train_steps"] = args.uniforget_steps
        elif kind == "finetune":
            table["steps"] = args.finetune_steps
        if "attack_steps" in table and args.attack_steps is not None:  # robust-wanda, adversarial
            table["attack_steps"] = args.attack_steps
        adapted[name] = table
    return adapted


def toml_text(arms: dict[str, dict]) -> str:
    """An arms file of flat tables (strings, numbers, booleans): JSON's string and number syntax is TOML's."""
    lines = []
    for name, table in arms.items():
        lines.append(f"[arms.{json.dumps(name)}]")
        lines += [f"{key} = {str(value).lower() if isinstance(value, bool) else json.dumps(value, ensure_ascii=False)}"
                  for key, value in table.items()]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--arms", default=None, help="comma-separated arm names of the preset (default: all)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps of locate, evaluate and attack")
    parser.add_argument("--seeds", type=int, default=2, help="evaluate seeds per prompt")
    parser.add_argument("--timesteps", type=int, default=10, help="τ of every prune")
    parser.add_argument("--locate-prompts", type=int, default=10)
    parser.add_argument("--uniforget-steps", type=int, default=50)
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--attack-steps", type=int, default=None,
                        help="attack steps per prompt and round of robust-wanda and adversarial (preset's)")
    parser.add_argument("--attack-prompts", type=int, default=10, help="held-out memorized captions attacked")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (of each process)")
    parser.add_argument("--processes", type=int, default=1,
                        help="local processes for evaluate's and the attack's generations (same results)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 steps, 1 seed, tiny budgets")
    parser.add_argument("--resume", action="store_true", help="continue the benchmark in --out")
    parser.add_argument("--overwrite", action="store_true", help="start the benchmark in --out again")
    parser.add_argument("--publish", action="store_true",
                        help="copy comparison.{csv,md,png} and arms.toml to data/testbed/comparison/")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.uniforget_steps, args.attack_prompts, args.finetune_steps = 4, 1, 2, 2, 2
        args.attack_steps = 1
        args.timesteps = min(args.timesteps, args.steps)  # τ cannot exceed the recorded steps
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as scratch:
        arms_file = Path(scratch) / "testbed_arms.toml"
        arms_file.write_text(toml_text(adapted_arms(args)))
        command = [sys.executable, "-m", "memprune", "benchmark", "--model", args.model, "--arms", arms_file,
                   "--steps", args.steps, "--seeds", args.seeds, "--attack-prompts", args.attack_prompts,
                   "--processes", args.processes, "--out", args.out, *(["--resume"] if args.resume else []),
                   *(["--overwrite"] if args.overwrite else [])]
        print("$ memprune " + " ".join(str(c) for c in command[3:]), flush=True)
        code = subprocess.run([str(c) for c in command], env=env, cwd=ROOT).returncode
    code = code or run_nemo_per_prompt(args, env)
    if code:
        return code
    if args.publish:
        target = ROOT / "data" / "testbed" / "comparison"
        target.mkdir(parents=True, exist_ok=True)
        for name in PUBLISHED:
            shutil.copy(args.out / name, target / name)
        if (args.out / NEMO_PER_PROMPT / "metrics.csv").is_file():
            for suffix in ("csv", "md"):
                shutil.copy(args.out / NEMO_PER_PROMPT / f"metrics.{suffix}", target / f"{NEMO_PER_PROMPT}.{suffix}")
        print(f"published to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
