"""Real scale without weights: full-size SD 1.5 / SDXL pipelines through locate -> prune -> evaluate -> attack.

Each pipeline is built from its published configuration (UNet, VAE, CLIP text encoders, scheduler) with random
weights — nothing is downloaded; the tokenizer is the offline byte-level CLIP tokenizer of tests/tiny_pipelines.py
with the real 77-token length — and saved once (SD 1.5 in float32, SDXL in float16 as published). Then every
command runs through the CLI in its own process with tiny settings (--steps, 1 prompt, 256 px, --device cpu), and
the script prints per command the peak resident memory of that process (os.wait4) and its wall time, the masks
file size and its extrapolation to 50 sampling steps, and prune's load / zero / save / verify times (its run.json).

    OMP_NUM_THREADS=1 nice python bench/real_scale.py --family sd15 --steps 2
    python bench/real_scale.py --family both --work /big/disk/real_scale   # SDXL: ~7 GB on disk, ~12 GB of memory

The figures are a CPU machine's; they bound what a GPU run holds in host memory for the same settings.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from record_overhead import SD15_UNET, SDXL_UNET  # noqa: E402

# The published VAE of SD 1.5 and SDXL (SDXL's differs in sample size, scaling factor and fp32 upcast only).
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, act_fn="silu")
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
# openai/clip-vit-large-patch14's text tower (SD 1.5, SDXL's first encoder) and OpenCLIP ViT-bigG's (SDXL's second).
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIG_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                  num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1)
COMMANDS = ["locate", "prune", "evaluate", "attack"]
FAMILIES = {"sd15": torch.float32, "sdxl": torch.float16}  # the dtype each is published (and saved here) in


def tokenizer():
    from tiny_pipelines import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.model_max_length = 77  # the real context length: the text encoders see 77 tokens as in the real models
    return tok


def text_encoder(tok, config: dict, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, **config)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def build(family: str):
    """The full-size pipeline of `family` with random weights, in its published dtype."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(0)
    tok = tokenizer()
    if family == "sd15":
        return StableDiffusionPipeline(
            vae=AutoencoderKL(**SD_VAE).eval(), text_encoder=text_encoder(tok, CLIP_L), tokenizer=tok,
            unet=UNet2DConditionModel(**SD15_UNET).eval(),
            scheduler=PNDMScheduler(**SCHEDULER, skip_prk_steps=True, set_alpha_to_one=False),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # built in fp16 directly: an fp32 SDXL UNet alone is 10 GB
    try:
        return StableDiffusionXLPipeline(
            vae=AutoencoderKL(**SDXL_VAE).eval(), text_encoder=text_encoder(tok, CLIP_L), tokenizer=tok,
            text_encoder_2=text_encoder(tok, CLIP_BIG_G, projection=True), tokenizer_2=tokenizer(),
            unet=UNet2DConditionModel(**SDXL_UNET).eval(),
            scheduler=EulerDiscreteScheduler(**SCHEDULER, timestep_spacing="leading"))
    finally:
        torch.set_default_dtype(default)


def save_model(family: str, folder: Path) -> float:
    """Build and save once (kept between runs); the seconds it took (0 when already there)."""
    if (folder / "model_index.json").is_file():
        return 0.0
    tic = time.perf_counter()
    pipe = build(family)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    del pipe
    return time.perf_counter() - tic


def write_inputs(folder: Path) -> dict[str, Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "image.png")
    (folder / "memorized.csv").write_text("caption,image\na photo of the red cat,image.png\n")
    (folder / "reference.txt").write_text("a blue square on white background\n")
    return {"memorized": folder / "memorized.csv", "reference": folder / "reference.txt"}


def run_cli(args: list[str], log: Path) -> dict:
    """`python -m memprune ARGS` in its own process: exit code, wall seconds, peak RSS (GiB) of that process."""
    tic = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, "-m", "memprune", *args], stdout=handle, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONPATH": str(ROOT)})
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": process.returncode, "seconds": time.perf_counter() - tic, "peak_rss_gib": usage.ru_maxrss / 2**20}


def bench_family(family: str, steps: int, work: Path, size: int, only: list[str] = COMMANDS) -> dict:
    model = work / f"{family}-model"
    build_seconds = save_model(family, model)
    inputs = write_inputs(work / "inputs")
    # Each family runs in the dtype it is published in (the commands' --dtype default, float32, would upcast SDXL).
    dtype = str(FAMILIES[family]).removeprefix("torch.")
    common = ["--device", "cpu", "--dtype", dtype, "--steps", str(steps), "--height", str(size), "--width", str(size)]
    runs = work / f"{family}-runs"
    runs.mkdir(exist_ok=True)
    located, pruned = runs / "located", runs / "pruned"
    commands = {
        "locate": ["locate", "--model", str(model), "--memorized", str(inputs["memorized"]), "--batch-size", "1",
                   *common, "--out", str(located)],
        "prune": ["prune", "--model", str(model), "--masks", str(located), "--timesteps", "1", "--device", "cpu",
                  "--out", str(pruned)],
        "evaluate": ["evaluate", "--model", str(model), "--edited", str(pruned), "--memorized",
                     str(inputs["memorized"]), "--reference", str(inputs["reference"]), "--control", "none",
                     "--general", "none", "--seeds", "1", "--batch-size", "1", "--grid-prompts", "0",
                     "--no-attributes", *common, "--out", str(runs / "evaluated")],
        "attack": ["attack", "--model", str(model), "--edited", str(pruned), "--prompts", str(inputs["memorized"]),
                   "--seeds", "1", "--attack-steps", "1", "--noise-samples", "1", "--threshold", "0.5", *common,
                   "--out", str(runs / "attacked")],
    }
    figures: dict = {"family": family, "build_and_save_s": round(build_seconds, 1),
                     "model_gib": sum(p.stat().st_size for p in model.rglob("*") if p.is_file()) / 2**30}
    for name, args in commands.items():
        if name not in only:  # its output of an earlier run (kept in --work) is used
            continue
        shutil.rmtree(args[-1], ignore_errors=True)
        result = run_cli(args, runs / f"{name}.log")
        figures[name] = result
        print(f"[{family}] {name}: exit {result['rc']}, {result['seconds']:.0f} s, peak RSS "
              f"{result['peak_rss_gib']:.2f} GiB", flush=True)
        if result["rc"] != 0:
            print((runs / f"{name}.log").read_text()[-3000:], flush=True)
            break
    if (located / "masks.safetensors").is_file():
        meta = json.loads((located / "masks.json").read_text())
        recorded = len(meta["steps"])
        size_bytes = (located / "masks.safetensors").stat().st_size
        figures["masks"] = {"mask_steps": recorded, "bytes": size_bytes,
                            "bytes_at_50_steps": size_bytes * 50 / recorded,
                            "denoiser_calls": meta.get("denoiser_calls")}
        print(f"[{family}] masks: {size_bytes / 2**20:.1f} MiB for {recorded} mask steps -> "
              f"{size_bytes * 50 / recorded / 2**20:.0f} MiB at 50 (ratio 0.01, int32 indices)", flush=True)
    if (pruned / "run.json").is_file():
        record = json.loads((pruned / "run.json").read_text())
        figures["prune_timings_s"] = record["timings_s"]
        figures["pruned_gib"] = sum(p.stat().st_size for p in pruned.rglob("*") if p.is_file()) / 2**30
        print(f"[{family}] prune timings (s): {record['timings_s']}; saved {figures['pruned_gib']:.2f} GiB "
              f"({record.get('saved_dtypes')}) from a {figures['model_gib']:.2f} GiB source", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["sd15", "sdxl", "both"], default="sd15")
    parser.add_argument("--steps", type=int, default=2, help="Sampling steps of every command.")
    parser.add_argument("--size", type=int, default=256, help="Image height and width in pixels.")
    parser.add_argument("--commands", default=",".join(COMMANDS),
                        help="Comma-separated commands to run (the others' outputs must be in --work from an "
                             "earlier run).")
    parser.add_argument("--work", type=Path, default=None,
                        help="Folder for the built models and runs (kept; default: a temporary folder, removed).")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="memprune-real-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    families = ["sd15", "sdxl"] if args.family == "both" else [args.family]
    try:
        only = args.commands.split(",")
        results = [bench_family(family, args.steps, work, args.size, only) for family in families]
        print(json.dumps(results, indent=1))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
