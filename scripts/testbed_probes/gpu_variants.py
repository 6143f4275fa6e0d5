"""Train one testbed variant on a GPU inside a wall-clock budget (issue 4: what makes memorization share a subspace).

Each variant is a TestbedConfig (see VARIANTS). The number of UNet steps is chosen from a short timing run
so that training ends by --deadline (a Unix time): several variants run side by side on one GPU, each
calibrating under the same contention. The chosen config is written to OUT/NAME/config.json, so
`memprune testbed train --preset NAME --steps N` (once the preset exists) retrains exactly this recipe.

    python scripts/testbed_probes/gpu_variants.py share03 --out runs/variants --deadline $(($(date +%s)+300))

Writes OUT/NAME/testbed (a full testbed folder), OUT/NAME/NAME_unet.safetensors (fp16 UNet; plus the
fp16 VAE when the variant trained its own) and OUT/NAME/train.json (steps, seconds per step, views).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from memprune.testbed.config import TestbedConfig, config_to_dict
from memprune.testbed.data import DataConfig, build_data
from memprune.testbed.model_card import describe_device
from memprune.testbed.presets import tiny
from memprune.testbed.train import (
    TrainingSet,
    build_tokenizer_and_text_encoder,
    encode_training_set,
    train_testbed,
    train_unet,
    train_vae,
)


def variant(batch_size=256, n_memorized=50, **kw) -> TestbedConfig:
    return TestbedConfig(batch_size=batch_size, data=DataConfig(n_memorized=n_memorized), **kw)


# Every variant sees ~5x the samples of the CPU recipe (batch 256); they differ in how memorization enters.
VARIANTS = {
    "share03": lambda: variant(memorized_share=0.03, memorized_start=0.0),  # a small share of a long run
    "share015": lambda: variant(memorized_share=0.015, memorized_start=0.0),  # smaller still
    "late08": lambda: variant(memorized_share=0.08, memorized_start=0.5),  # added to a trained model
    "many200": lambda: variant(n_memorized=200, memorized_share=0.12, memorized_start=0.0),
    "many400": lambda: variant(n_memorized=400, memorized_share=0.25, memorized_start=0.0),
    # late08's recipe with the share set, once the steps are known, so each memorized image gets N views
    "late700": lambda: variant(memorized_share=0.08, memorized_start=0.5),
    "late1000": lambda: variant(memorized_share=0.08, memorized_start=0.5),
    # seconds on a CPU: checks this script and the phenomenon script end to end, memorizes nothing
    "smoke": lambda: dataclasses.replace(
        tiny(), data=dataclasses.replace(tiny().data, n_memorized=12, n_control=12, max_pool_emoji=24)),
}
TARGET_VIEWS = {"late700": 700, "late1000": 1000}


def prepare(cfg: TestbedConfig, work: Path, device: str) -> TrainingSet:
    """Data, text encoder and VAE (trained into work/vae unless cached there), encoded once for the timing runs."""
    data = build_data(dataclasses.replace(cfg.data, seed=cfg.seed))
    tokenizer, text_encoder = build_tokenizer_and_text_encoder(cfg, data)
    vae = train_vae(cfg, data, str(work), False, device).eval().requires_grad_(False)
    return encode_training_set(data, vae, tokenizer, text_encoder)


def time_steps(cfg: TestbedConfig, ts: TrainingSet, probe_dir: Path, device: str, steps: int) -> float:
    """Seconds for `steps` UNet steps of this config (a throwaway checkpoint in `probe_dir`)."""
    probe = dataclasses.replace(cfg, steps=steps, warmup_steps=1, keep_snapshots=False, checkpoint_every_s=1e9)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.time()
    train_unet(probe, ts, str(probe_dir), False, None, None, device)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    (probe_dir / "unet_ckpt.pt").unlink()
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(VARIANTS))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--deadline", type=float, required=True, help="Unix time by which training must end")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--vae", default=None, help="a cached VAE folder trained with the same data and VAE settings")
    parser.add_argument("--max-steps", type=int, default=12000)
    parser.add_argument("--min-steps", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = VARIANTS[args.name]()
    root = args.out / args.name
    work = root / "work"
    work.mkdir(parents=True, exist_ok=True)
    if args.vae:
        shutil.copytree(args.vae, work / "vae", dirs_exist_ok=True)
    probe_dir = root / "probe"
    probe_dir.mkdir(exist_ok=True)
    ts = prepare(base, work, args.device)  # the VAE it trains (if not given) is train_testbed's cache below
    # 10 steps warm up the GPU, 40 more give the per-step time under the current contention.
    t10 = time_steps(base, ts, probe_dir, args.device, 10)
    t50 = time_steps(base, ts, probe_dir, args.device, 50)
    del ts
    per_step = max((t50 - t10) / 40, 1e-3)
    margin = 25.0  # data, encoding and writing the folder
    budget = args.deadline - time.time() - margin
    steps = int(min(args.max_steps, max(args.min_steps, budget / per_step * 0.9)) // 250 * 250) or args.min_steps
    cfg = dataclasses.replace(base, steps=steps, keep_snapshots=False, checkpoint_every_s=1e9, threads=args.threads)
    if args.name in TARGET_VIEWS:
        per_share = cfg.views_per_memorized / cfg.memorized_share
        cfg = dataclasses.replace(cfg, memorized_share=round(TARGET_VIEWS[args.name] / per_share, 4))
    (root / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1))
    print(f"{args.name}: {per_step * 1000:.1f} ms/step -> {steps} steps, "
          f"{cfg.views_per_memorized:.0f} views each", flush=True)
    start = time.time()
    train_testbed(cfg, str(root / "testbed"), work_dir=str(work), progress=False, device=args.device,
                  log=lambda m: print(f"{args.name}: {m}", flush=True))
    seconds = time.time() - start
    shutil.copy(root / "testbed" / "unet" / "diffusion_pytorch_model.safetensors",
                root / f"{args.name}_unet.safetensors")
    if not args.vae:
        shutil.copy(root / "testbed" / "vae" / "diffusion_pytorch_model.safetensors",
                    root / f"{args.name}_vae.safetensors")
    info = {"name": args.name, "steps": steps, "ms_per_step": per_step * 1000, "train_seconds": seconds,
            "views_per_memorized": cfg.views_per_memorized, "device": describe_device(args.device, args.threads)}
    (root / "train.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info), flush=True)


if __name__ == "__main__":
    main()
