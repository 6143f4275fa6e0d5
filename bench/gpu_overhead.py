"""GPU cost of recording at SD1.5, SDXL and PixArt-α scale: hooked / plain, fused and eager, measured in one run.

One command on a machine with a CUDA GPU:

    python bench/gpu_overhead.py                # fp16, 20 steps, CFG batch 2 (of 1 prompt), median of 5
    python bench/gpu_overhead.py --batch 8      # CFG batch 16

Denoisers are built from the real configs with random weights (layer shapes, so costs, are real) and driven as a
sampler drives them: `--steps` calls on a CFG batch [uncond, cond]. SD1.5 runs at 64x64 latents (512 px), SDXL at
128x128 (1024 px), PixArt-α at 128x128 (1024 px, 4096 tokens, 120 T5 tokens). Variants, alternated `--repeats` times:
- plain: no hooks
- fused: memprune's recorder as `locate` runs it (torch.compile'd statistics, fp32 on the device, one copy of the
  statistics to the host at the end of the generation)
- eager: the same with plain torch statistics (MEMPRUNE_FUSED=0's path)
The goal is fused/plain <= 1.05 at SD1.5 and SDXL (for orientation, an H200 measured 1.15x / 1.23x for an eager
fp32 statistic in the hook and 1.57x / 3.32x for copying activations to the host). Before timing, the compiled
statistics are checked against float64 numbers on a real activation of each model.

    python bench/gpu_overhead.py --smoke        # tiny shapes, runs anywhere (CPU too): checks the script itself
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import PixArtTransformer2DModel, UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_overhead import SD15_UNET, SDXL_UNET  # noqa: E402

import memprune.reduce as reduce  # noqa: E402
from memprune.models import output_linears  # noqa: E402
from memprune.record import ActivationRecorder  # noqa: E402

PIXART_ALPHA_1024 = dict(  # PixArt-alpha/PixArt-XL-2-1024-MS transformer config
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
    cross_attention_dim=1152, attention_bias=True, sample_size=128, patch_size=2, activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    caption_channels=4096, use_additional_conditions=True,
)
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                 attention_head_dim=8, norm_num_groups=8)
TINY_PIXART = dict(PIXART_ALPHA_1024, num_attention_heads=2, attention_head_dim=8, num_layers=2, cross_attention_dim=16,
                   caption_channels=32, sample_size=8, use_additional_conditions=False)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def unet_sampler(unet, device, dtype, latent, steps, batch, text_tokens=77):
    g = torch.Generator("cpu").manual_seed(0)
    n = 2 * batch
    sample = torch.randn(n, 4, latent, latent, generator=g).to(device, dtype)
    context = torch.randn(n, text_tokens, unet.config.cross_attention_dim, generator=g).to(device, dtype)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        px = latent * 8
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(n, 1280, generator=g).to(device, dtype),
            "time_ids": torch.tensor([[px, px, 0, 0, px, px]] * n, dtype=dtype, device=device)}

    def run():
        with torch.inference_mode():
            for step in range(steps):
                unet(sample, torch.tensor(999 - step * (1000 // steps), device=device), encoder_hidden_states=context,
                     **extra)

    return run


def pixart_sampler(transformer, device, dtype, latent, steps, batch, text_tokens=120):
    g = torch.Generator("cpu").manual_seed(0)
    n = 2 * batch
    sample = torch.randn(n, 4, latent, latent, generator=g).to(device, dtype)
    context = torch.randn(n, text_tokens, transformer.config.caption_channels, generator=g).to(device, dtype)
    mask = torch.ones(n, text_tokens, device=device, dtype=dtype)
    px = float(latent * 8)
    added = {"resolution": torch.tensor([[px, px]] * n, device=device, dtype=dtype),
             "aspect_ratio": torch.tensor([[1.0]] * n, device=device, dtype=dtype)}

    def run():
        with torch.inference_mode():
            for step in range(steps):
                timestep = torch.full((n,), 999 - step * (1000 // steps), device=device)
                transformer(sample, encoder_hidden_states=context, encoder_attention_mask=mask, timestep=timestep,
                            added_cond_kwargs=added)

    return run


def check_compiled_numbers(net, run, device) -> str:
    """Catch one real activation per FeedForward and compare compiled (or eager) statistics with float64 ones."""
    caught = {}
    handles = [linear.register_forward_pre_hook(lambda m, a, name=name: caught.setdefault(name, a[0].detach().clone()))
               for name, linear in output_linears(net).items()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    worst = 0.0
    for x in caught.values():
        x = x if x.dim() == 3 else x.unsqueeze(1)
        got = reduce.batch_statistics(x)
        xd = x.double()
        squares = xd * xd
        sumsq = (squares / squares.sum(-1, keepdim=True)).sum((0, 1))
        means = xd.mean(1)
        want = (sumsq, means.mean(0), (means - means.mean(0)).square().sum(0))
        # m2 of 2 samples is tiny and ill-conditioned: compare the others
        for g_, w in zip(got[:2], want[:2], strict=True):
            worst = max(worst, ((g_.double() - w).abs().max() / w.abs().max()).item())
    path = "compiled (torch.compile)" if reduce.fused_available(device) else "eager"
    return f"{path} statistics vs float64 on {len(caught)} real activations: max rel diff {worst:.1e}"


def measure(name, run, net, device, repeats):
    def hooked(fused: bool):
        def go():
            saved = reduce._compile_failed
            reduce._compile_failed = not fused  # the eager variant: as if MEMPRUNE_FUSED=0
            try:
                recorder = ActivationRecorder(net, half="both", cfg=True)
                with recorder:
                    recorder.new_generation()
                    run()
                recorder.take_stats().to("cpu")  # locate's end-of-call copy to the host
            finally:
                reduce._compile_failed = saved
        return go

    variants = {"plain": run, "fused": hooked(True), "eager": hooked(False)}
    for fn in variants.values():  # warm-up: allocator, cuDNN autotune, compilation of every shape
        fn()
    times = {key: [] for key in variants}
    for _ in range(repeats):
        for key, fn in variants.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[key].append(time.perf_counter() - start)
    med = {key: statistics.median(v) for key, v in times.items()}
    print(f"{name:<40} plain {med['plain']:7.3f} s   "
          f"fused {med['fused']:7.3f} s (x{med['fused'] / med['plain']:5.3f})   "
          f"eager {med['eager']:7.3f} s (x{med['eager'] / med['plain']:5.3f})", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1, help="prompts per call (the CFG batch is twice this)")
    parser.add_argument("--only", nargs="+", choices=["sd15", "sdxl", "pixart"], default=["sd15", "sdxl", "pixart"])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 2 steps: check the script, not the GPU")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        sys.exit("bench/gpu_overhead.py needs a CUDA GPU (or --smoke to check the script on CPU).")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    steps, repeats = (2, 1) if args.smoke else (args.steps, args.repeats)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name}, {dtype}, {steps} steps, CFG batch {2 * args.batch}, median of {repeats}; "
          f"compiled statistics available: {reduce.fused_available(device)}", flush=True)
    scales = {
        "sd15": ("SD1.5 UNet", lambda: UNet2DConditionModel(**(TINY_UNET if args.smoke else SD15_UNET)),
                 unet_sampler, 8 if args.smoke else 64),
        "sdxl": ("SDXL UNet", lambda: UNet2DConditionModel(**(TINY_UNET if args.smoke else SDXL_UNET)),
                 unet_sampler, 8 if args.smoke else 128),
        "pixart": ("PixArt-alpha 1024",
                   lambda: PixArtTransformer2DModel(**(TINY_PIXART if args.smoke else PIXART_ALPHA_1024)),
                   pixart_sampler, 8 if args.smoke else 128),
    }
    for key in args.only:
        label, build, sampler, latent = scales[key]
        torch.manual_seed(0)
        net = build().to(device, dtype).eval()
        run = sampler(net, device, dtype, latent, steps, args.batch)
        print(f"  {check_compiled_numbers(net, run, device)}", flush=True)
        measure(f"{label}, {latent}x{latent} latents", run, net, device, repeats)
        del net, run
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
