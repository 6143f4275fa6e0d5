"""Locate throughput (prompts/s) with 1, 2 and 4 processes, measured in one run, and that every run agrees.

Each run is `locate_to_folder(..., processes=N)` on the same model and prompts (memorized + as many reference
prompts). Two numbers per N: end to end (start-up of the processes, model load, recording, merge, writing) and
recording only (run.json's "locate" timing of the main process, which includes the gather and merge). Ratios are to
1 process. Masks must equal the 1-process masks exactly; stats to 1e-12 relative.

    python bench/locate_throughput.py                      # the embedded testbed, 16 prompts, 10 steps
    python bench/locate_throughput.py --model tiny --processes 1 2     # the tiny test pipeline
    python bench/locate_throughput.py --model path/to/sd --prompts p.csv --device cuda --processes 1 2 4

On CPU every process gets `--threads` threads (N processes use N times the cores: the throughput of more cores,
and the same float32 kernels in every process, so the statistics agree to 1e-12). On CUDA each process takes one GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from memprune.commands.locate import locate_to_folder  # noqa: E402
from memprune.generate import GenerationSettings  # noqa: E402
from memprune.locate import LocateSettings  # noqa: E402
from memprune.masks import Masks  # noqa: E402
from memprune.models import DEFAULT_MODEL  # noqa: E402
from memprune.stats import FIELDS, NeuronStats  # noqa: E402


def max_relative_difference(a: NeuronStats, b: NeuronStats) -> float:
    worst = 0.0
    for key, acc in a.accumulators.items():
        for name in FIELDS:
            x, y = getattr(acc, name), getattr(b[key], name)
            worst = max(worst, ((x - y).abs().max() / x.abs().max().clamp_min(1e-300)).item())
    return worst


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="pipeline folder, or 'tiny' (the SD1-like test pipeline)")
    parser.add_argument("--prompts", default=None, help="memorized prompts (default: the testbed's memorized.csv)")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="memprune-throughput-"))
    model = args.model
    if model == "tiny":
        from tiny_pipelines import sd1_pipeline

        model = str(work / "tiny")
        sd1_pipeline().save_pretrained(model)
    prompts = args.prompts or str(Path(model) / "captions" / "memorized.csv")
    if args.prompts is None and not Path(prompts).is_file():
        prompts = str(work / "prompts.txt")
        Path(prompts).write_text("\n".join(f"a red circle {i}" for i in range(args.num_prompts)) + "\n")
    settings = LocateSettings(model=model, memorized=prompts, num_prompts=args.num_prompts,
                              generation=GenerationSettings(steps=args.steps, batch_size=args.batch_size))
    print(f"{model}: {args.num_prompts} memorized + {args.num_prompts} reference prompts, {args.steps} steps, "
          f"batch {args.batch_size}, device {args.device}, {args.threads} thread(s) per process", flush=True)
    results = {}
    for n in args.processes:
        out = work / f"p{n}"
        torch.set_num_threads(args.threads * n)  # spawn gives each of the n processes a 1/n share
        start = time.perf_counter()
        locate_to_folder(settings, out, device=args.device, processes=n)
        total = time.perf_counter() - start
        recording = json.loads((out / "run.json").read_text())["timings_s"]["locate"]
        results[n] = (total, recording)
        prompts_done = 2 * args.num_prompts
        line = (f"{n} process{'es' if n > 1 else '  '}: "
                f"end to end {total:7.1f} s ({prompts_done / total:6.2f} prompts/s), "
                f"recording {recording:7.1f} s ({prompts_done / recording:6.2f} prompts/s)")
        if n != args.processes[0]:
            first = args.processes[0]
            base_total, base_recording = results[first]
            same = all(torch.equal(a, b) for a, b in zip(Masks.load(work / f"p{first}").indices.values(),
                                                          Masks.load(out).indices.values(), strict=False))
            diff = max(max_relative_difference(NeuronStats.load(work / f"p{first}" / "stats" / f"{s}.safetensors"),
                                               NeuronStats.load(out / "stats" / f"{s}.safetensors"))
                       for s in ("memorized", "reference"))
            line += (f"   speed-up vs {first}: end to end x{base_total / total:4.2f}, "
                     f"recording x{base_recording / recording:4.2f}"
                     f"   masks equal: {same}, stats max rel diff {diff:.1e}")
        print(line, flush=True)


if __name__ == "__main__":
    main()
