"""Seeded generation in prompt batches: the one place that calls a pipeline, for recording and evaluation."""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class GenerationSettings:
    steps: int = 50  # num_inference_steps
    seeds: int = 1  # generations per prompt, seeds seed .. seed+seeds-1
    seed: int = 0
    guidance_scale: float | None = None  # None: the pipeline's own default (7.5 for SD 1.x/2.x, 5.0 for SDXL)
    batch_size: int = 8  # prompts per pipeline call


def default_guidance_scale(pipe) -> float:
    parameter = inspect.signature(pipe.__call__).parameters.get("guidance_scale")
    return float(parameter.default) if parameter is not None and parameter.default is not inspect._empty else 1.0


def guidance_scale(pipe, settings: GenerationSettings) -> float:
    return settings.guidance_scale if settings.guidance_scale is not None else default_guidance_scale(pipe)


def uses_cfg(pipe, settings: GenerationSettings) -> bool:
    """diffusers runs classifier-free guidance (a doubled [uncond, cond] batch) when guidance_scale > 1."""
    return guidance_scale(pipe, settings) > 1.0


def batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def generate(pipe, prompts: list[str], settings: GenerationSettings, output_type: str = "pil", before_call=None,
             progress: bool = True, desc: str = "generating", **call_kwargs):
    """Yield (prompt_index, seed, image_or_latent) for every prompt and seed, in a fixed order.

    Each generation has its own CPU generator seeded with `seed`, so a prompt's result does not depend on the
    batch it runs in, nor on the device. `before_call` runs before each pipeline call (the recorder's step reset).
    """
    total = settings.seeds * ((len(prompts) + settings.batch_size - 1) // settings.batch_size)
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    with torch.inference_mode():
        for seed in range(settings.seed, settings.seed + settings.seeds):
            for start, batch in batches(prompts, settings.batch_size):
                if before_call is not None:
                    before_call()
                generators = [torch.Generator("cpu").manual_seed(seed) for _ in batch]
                output = pipe(
                    prompt=batch,
                    num_inference_steps=settings.steps,
                    guidance_scale=guidance_scale(pipe, settings),
                    generator=generators,
                    output_type=output_type,
                    **call_kwargs,
                )
                results = output.images
                for offset in range(len(batch)):
                    yield start + offset, seed, results[offset]
                bar.update(1)
    bar.close()
