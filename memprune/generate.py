"""Seeded generation in prompt batches: the one place that calls a pipeline, for recording and evaluation."""
from __future__ import annotations

import importlib.util
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
    height: int | None = None  # image size in pixels; None: the pipeline's default
    width: int | None = None


@dataclass(frozen=True)
class Call:
    """One pipeline call: the prompts at `start..start+len(prompts)-1` generated with one seed.

    The unit of sharded and resumable recording: one call's statistics do not depend on which process runs it."""

    seed: int
    start: int
    prompts: tuple[str, ...]


def call_plan(prompts: list[str], settings: GenerationSettings) -> list[Call]:
    """Every pipeline call of `generate`, in its fixed order (seed-major, then prompt batches)."""
    return [Call(seed, start, tuple(batch))
            for seed in range(settings.seed, settings.seed + settings.seeds)
            for start, batch in batches(prompts, settings.batch_size)]


def default_guidance_scale(pipe) -> float:
    parameter = inspect.signature(pipe.__call__).parameters.get("guidance_scale")
    return float(parameter.default) if parameter is not None and parameter.default is not inspect._empty else 1.0


def guidance_scale(pipe, settings: GenerationSettings) -> float:
    return settings.guidance_scale if settings.guidance_scale is not None else default_guidance_scale(pipe)


def guidance_distilled(pipe) -> bool:
    """Flux-style pipelines feed the guidance scale to the transformer (a guidance embedding, `guidance_embeds` in
    its config) and never batch [unconditional, conditional]: there is no CFG half to pick."""
    net = getattr(pipe, "transformer", None)
    return net is not None and "guidance_embeds" in getattr(net, "config", {})


def uses_cfg(pipe, settings: GenerationSettings) -> bool:
    """diffusers runs classifier-free guidance (a doubled [uncond, cond] batch) when guidance_scale > 1,
    except in guidance-distilled pipelines (Flux), where the scale is an input of the denoiser."""
    return not guidance_distilled(pipe) and guidance_scale(pipe, settings) > 1.0


# PixArt pipelines snap the image size to aspect-ratio bins known only for these transformer sample sizes.
RESOLUTION_BINNED_SAMPLE_SIZES = (32, 64, 128, 256)


def pipeline_call_kwargs(pipe, settings: GenerationSettings) -> dict:
    """Per-family call arguments: the asked image size, and PixArt's options that would fail or warn otherwise."""
    parameters = inspect.signature(pipe.__call__).parameters
    kwargs = {name: value for name, value in (("height", settings.height), ("width", settings.width))
              if value is not None}
    if "use_resolution_binning" in parameters:
        config = getattr(getattr(pipe, "transformer", None), "config", {})
        # Binning raises for other sample sizes, and would replace a size the user asked for.
        if kwargs or config.get("sample_size") not in RESOLUTION_BINNED_SAMPLE_SIZES:
            kwargs["use_resolution_binning"] = False
    if "clean_caption" in parameters and not all(importlib.util.find_spec(name) for name in ("bs4", "ftfy")):
        kwargs["clean_caption"] = False  # what diffusers falls back to anyway, without a warning per call
    return kwargs


def batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def generate(pipe, prompts: list[str], settings: GenerationSettings, output_type: str = "pil", before_call=None,
             progress: bool = True, desc: str = "generating", calls: list[Call] | None = None, after_call=None,
             **call_kwargs):
    """Yield (prompt_index, seed, image_or_latent) for every prompt and seed, in a fixed order.

    Each generation has its own CPU generator seeded with `seed`, so a prompt's result does not depend on the
    batch it runs in, nor on the device. `before_call` runs before each pipeline call (the recorder's step reset),
    `after_call(call)` after it. `calls` (default: all of `call_plan`) runs only those calls: a shard, or the rest
    of an interrupted run.
    """
    calls = call_plan(prompts, settings) if calls is None else calls
    call_kwargs = {**pipeline_call_kwargs(pipe, settings), **call_kwargs}
    bar = tqdm(total=len(calls), desc=desc, disable=not progress, leave=False)
    with torch.inference_mode():
        for call in calls:
            batch = list(call.prompts)
            if before_call is not None:
                before_call()
            generators = [torch.Generator("cpu").manual_seed(call.seed) for _ in batch]
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
                yield call.start + offset, call.seed, results[offset]
            if after_call is not None:
                after_call(call)
            bar.update(1)
    bar.close()
