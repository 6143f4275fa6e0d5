"""Cost of recording: hooked vs plain generation time, measured in one run, at three scales.

Scales: the tiny test pipelines (full generation: SD1-like, and the DiT family PixArt / SD3 / Flux), and UNets built
from the real SD 1.5 and SDXL configs with random weights (the layer shapes and so the cost are real), driven as a
sampler drives them: `--steps` denoiser calls on a CFG batch of 2. Plain and hooked runs alternate, `--repeats`
times; the ratio of medians is printed. The hooked runs hand each call's statistics to the host as locate does.
Also prints the statistics' memory after 10 vs 500 prompts (it must not grow with the number of prompts).
On a GPU, bench/gpu_overhead.py measures the same at SD1.5 / SDXL / PixArt scale, fused and eager.

    python bench/record_overhead.py            # CPU: small latents; CUDA: fp16, SD1.5 64x64, SDXL 128x128
    python bench/record_overhead.py --quick    # tiny + SD1.5 only
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from memprune.generate import GenerationSettings, generate  # noqa: E402
from memprune.record import ActivationRecorder  # noqa: E402
from tiny_dit_pipelines import DIT_BUILDERS, TINY_SIZE  # noqa: E402
from tiny_pipelines import sd1_pipeline  # noqa: E402

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def unet_sampler(unet, device, dtype, latent: int, steps: int, text_tokens: int = 77):
    """A function that calls the UNet `steps` times like a CFG sampler does (batch [uncond, cond])."""
    generator = torch.Generator("cpu").manual_seed(0)
    sample = torch.randn(2, 4, latent, latent, generator=generator).to(device, dtype)
    context = torch.randn(2, text_tokens, unet.config.cross_attention_dim, generator=generator).to(device, dtype)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, 1280, generator=generator).to(device, dtype),
            "time_ids": torch.tensor([[latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]] * 2, dtype=dtype,
                                     device=device),
        }

    def run():
        with torch.inference_mode():
            for step in range(steps):
                unet(sample, 999 - step * (1000 // steps), encoder_hidden_states=context, **extra)

    return run


def compare(name: str, run, net, device, repeats: int) -> float:
    recorder = ActivationRecorder(net, half="both", cfg=True)

    def hooked():
        with recorder:
            recorder.new_generation()
            run()
        recorder.take_stats().to("cpu")  # what locate does after every pipeline call

    run()  # warm-up (allocator, kernels)
    hooked()
    plain_times, hooked_times = [], []
    for _ in range(repeats):
        plain_times.append(timed(run, device))
        hooked_times.append(timed(hooked, device))
    plain, with_hooks = statistics.median(plain_times), statistics.median(hooked_times)
    ratio = with_hooks / plain
    print(f"{name:<34} plain {plain:8.3f} s   hooked {with_hooks:8.3f} s   ratio {ratio:5.3f}", flush=True)
    return ratio


def stats_bytes(stats) -> int:
    return sum(t.numel() * t.element_size()
               for a in stats.accumulators.values() for t in (a.sumsq_normed, a.mean, a.m2))


def memory_check(device):
    pipe = sd1_pipeline().to(device)
    pipe.set_progress_bar_config(disable=True)
    for count in (10, 500):
        recorder = ActivationRecorder(pipe.unet)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with recorder:
            prompts = [f"a red circle {i}" for i in range(count)]
            for _ in generate(pipe, prompts, GenerationSettings(steps=5, batch_size=50),
                              output_type="latent", before_call=recorder.new_generation, progress=False):
                pass
        peak = (f", peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB"
                if device.type == "cuda" else "")
        print(f"statistics after {count:>3} prompts: {stats_bytes(recorder.stats) / 2**10:.1f} KiB{peak}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="skip SDXL")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{args.threads} CPU threads"
    print(f"device {device} ({where}), "
          f"{dtype}, {args.steps} steps, CFG batch 2, median of {args.repeats}")

    tiny = sd1_pipeline().to(device)
    tiny.set_progress_bar_config(disable=True)
    settings = GenerationSettings(steps=args.steps, batch_size=4)
    compare("tiny SD1-like pipeline (4 prompts)",
            lambda: list(generate(tiny, ["a red circle"] * 4, settings, output_type="latent", progress=False)),
            tiny.unet, device, args.repeats)
    for name, build in DIT_BUILDERS.items():
        pipe = build().to(device)
        pipe.set_progress_bar_config(disable=True)
        dit_settings = GenerationSettings(steps=args.steps, batch_size=4, height=TINY_SIZE, width=TINY_SIZE)
        compare(f"tiny {name} pipeline (4 prompts)",
                lambda pipe=pipe, dit_settings=dit_settings: list(generate(pipe, ["a red circle"] * 4, dit_settings,
                                                                           output_type="latent", progress=False)),
                pipe.transformer, device, args.repeats)

    # On CPU real resolutions take minutes per call: smaller latents keep every layer shape (H, C) real.
    scales = [("SD1.5 UNet", SD15_UNET, 64 if device.type == "cuda" else 16)]
    if not args.quick:
        scales.append(("SDXL UNet", SDXL_UNET, 128 if device.type == "cuda" else 16))
    for name, config, latent in scales:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**config).to(device, dtype).eval()
        steps = args.steps if device.type == "cuda" else max(2, args.steps // 5)
        compare(f"{name} ({latent}x{latent} latents, {steps} steps)", unet_sampler(unet, device, dtype, latent, steps),
                unet, device, args.repeats)
        del unet
    memory_check(device)


if __name__ == "__main__":
    main()
