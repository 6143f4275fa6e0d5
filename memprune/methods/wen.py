"""Wen et al. (ICLR 2024) inference-time mitigation: optimise the prompt embedding at the first sampling step.

Per generation (per prompt and seed) and before sampling:

1. encode the prompt and the negative (empty) prompt as the pipeline does (memprune.conditioning.encode: the
   keyword arguments of its own first denoiser call, so UNets and CFG DiTs such as PixArt and SD3 alike; a
   guidance-distilled pipeline such as Flux has no unconditional prediction and is refused);
2. draw the initial latent x_T from the generation's own generator (its state is restored afterwards, so the
   pipeline then draws the same x_T), take the first timestep t_0 of the schedule;
3. at most ``max_iterations`` times: compute the text-conditional noise norm
   ``d = ‖ε(x_T, t_0, e_p) − ε(x_T, t_0, e_∅)‖₂`` (norm over C, H, W of one sample — the first-step detection score
   of memprune.detect); stop as soon as ``d <= target``; else take one AdamW step (torch defaults: betas 0.9/0.999,
   weight decay 0.01) on the prompt's token embeddings e_p with ``lr``. As in Wen et al.'s code the first (BOS)
   token gets no gradient, the unconditional embedding stays fixed, and the check comes before the step, so at most
   ``max_iterations`` denoiser passes (batch [e_∅, e_p]) are added per image;
4. generate with the stock pipeline from ``prompt_embeds = e_p*`` and ``negative_prompt_embeds = e_∅`` (plus the
   family's pooled embeddings or attention masks as encoded). On flow-matching models (SD3) ε is the predicted
   velocity.

Prompts of one pipeline call are optimised independently (one optimizer and one stop per prompt; the denoiser treats
samples independently) in one batched denoiser pass per iteration. On SDXL the token embeddings (concatenated from
both encoders) are optimised; the pooled embedding and the time ids stay as encoded. No weight is changed and no
weight gets a gradient: parameters have requires_grad False during the optimisation (restored afterwards) and the
gradient is taken with torch.autograd.grad with respect to the embeddings only.

Target. Wen et al.'s code has no default (``--optim_target_loss None`` = no mitigation) and their scripts use 3 on
Stable Diffusion v1.4 (64×64×4 latents), a value at the level of the noise norms of non-memorized prompts. The norm
scales with the model and the latent size (on the embedded testbed non-memorized prompts sit near 14, memorized ones
near 21), so memprune does not hard-code 3: without an explicit target, ``memprune evaluate --mitigation wen``
calibrates it in the same run as the median first-step noise norm of the unedited model on the non-memorized
calibration prompts (the group that also calibrates the copy threshold), over the evaluation seeds
(``calibrate_target``). Give ``--wen-target 3`` to reproduce Wen et al.'s setting on SD v1.4.

Classifier-free guidance is required (the norm compares the two CFG branches): guidance scale <= 1 is refused.
An embedding that becomes NaN or inf stops the run with the prompt's text.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch

from ..conditioning import (
    Conditioning,
    check_finite,
    default_size,
    encode,
    frozen,
    gradients_enabled,
    pipeline_kwargs,
    predict_noise,
    require_cfg_pipeline,
    scaled_input,
    text_noise_norm,
)
from ..errors import MemPruneError
from ..models import denoiser, pipeline_modules
from .base import MethodInfo

METHOD = MethodInfo(
    "wen", "mitigation",
    "Wen et al. ICLR 2024: per generation, AdamW on the prompt embedding at the first step until the text-conditional "
    "noise norm falls below a target, then generate",
    "Wen, Liu, Chen, Lyu. Detecting, Explaining, and Mitigating Memorization in Diffusion Models. ICLR 2024.",
)


@dataclass
class WenSettings:
    lr: float = 0.05  # AdamW learning rate on the token embeddings (Wen et al.)
    max_iterations: int = 10  # at most this many norm evaluations / steps per generation (Wen et al.)
    target: float | None = None  # stop below this noise norm; None: calibrate (see calibrate_target)

    def __post_init__(self):
        if not self.lr > 0:
            raise MemPruneError(f"--wen-lr must be positive, got {self.lr}.")
        if self.max_iterations < 1:
            raise MemPruneError(f"--wen-iterations must be at least 1, got {self.max_iterations}.")
        if self.target is not None and not self.target >= 0:
            raise MemPruneError(f"--wen-target must be 0 or more, got {self.target}.")


@dataclass
class WenRecord:
    """What the optimisation did for one generation."""
    prompt: str
    initial_norm: float  # noise norm of the original embedding
    last_norm: float  # the last norm evaluated (below target when reached)
    iterations: int  # AdamW steps taken
    reached: bool  # the norm fell to the target


def _noise_norms(pipe, model_input, t, cond, conditioning: Conditioning, rows) -> torch.Tensor:
    """‖ε(x, t, e_p) − ε(x, t, e_∅)‖₂ per sample for the given rows, one batched [uncond, cond] pass."""
    x = model_input[rows]
    return text_noise_norm(predict_noise(pipe, torch.cat([x, x]), t, conditioning.cfg_kwargs(cond, rows)))



def _generators(generator, count: int) -> list[torch.Generator] | torch.Generator:
    """A generator per prompt, or one generator for them all, passed on as it is (the pipeline draws from it)."""
    if generator is None:  # the pipeline would draw from the global RNG: fix seeds so both draws agree
        seeds = torch.randint(0, 2**62, (count,)).tolist()
        return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    if isinstance(generator, torch.Generator):
        return [generator] if count == 1 else generator
    if len(generator) != count:
        raise MemPruneError(f"{len(generator)} generators were given for {count} prompts.")
    return list(generator)


def initial_latents(pipe, generators, count: int, size: tuple[int, int], dtype) -> torch.Tensor:
    """The pipeline's x_T for these generators, leaving every generator in the state it had (so the pipeline redraws
    the same x_T)."""
    generator_list = generators if isinstance(generators, list) else [generators]
    states = [g.get_state() for g in generator_list]
    net = denoiser(pipe)
    latents = pipe.prepare_latents(count, net.config.in_channels, size[0], size[1], dtype, net.device, generators, None)
    for g, state in zip(generator_list, states, strict=True):
        g.set_state(state)
    return latents


def optimise_embeddings(pipe, prompts: list[str], conditioning: Conditioning, model_input: torch.Tensor, t,
                        settings: WenSettings) -> tuple[torch.Tensor, list[WenRecord]]:
    """Wen's loop (module docstring) for each prompt; returns the optimised token embeddings (B, T, D) and records."""
    target = settings.target
    leaves = [conditioning.cond[i : i + 1].clone().requires_grad_(True) for i in range(len(prompts))]
    optimizers = [torch.optim.AdamW([leaf], lr=settings.lr) for leaf in leaves]
    initial = [float("nan")] * len(prompts)
    last = [float("nan")] * len(prompts)
    steps = [0] * len(prompts)
    reached = [False] * len(prompts)
    active = list(range(len(prompts)))
    for iteration in range(settings.max_iterations):
        norms = _noise_norms(pipe, model_input, t, torch.cat([leaves[i] for i in active]), conditioning, active)
        values = norms.detach().cpu().tolist()
        still = []
        for position, i in enumerate(active):
            if iteration == 0:
                initial[i] = values[position]
            last[i] = values[position]
            if values[position] <= target:
                reached[i] = True
            else:
                still.append(position)
        if not still:
            break
        loss = norms[still].sum()  # samples are independent: each leaf gets the gradient of its own norm
        gradients = torch.autograd.grad(loss, [leaves[active[p]] for p in still])
        for position, gradient in zip(still, gradients, strict=True):
            i = active[position]
            gradient = gradient.clone()
            gradient[:, 0] = 0  # the BOS token stays (Wen et al.)
            leaves[i].grad = gradient
            optimizers[i].step()
            optimizers[i].zero_grad(set_to_none=True)
            steps[i] += 1
            check_finite(leaves[i], [prompts[i]], "Wen-optimised prompt embedding")
        active = [active[p] for p in still]
    records = [WenRecord(prompts[i], initial[i], last[i], steps[i], reached[i]) for i in range(len(prompts))]
    return torch.cat([leaf.detach() for leaf in leaves]), records


class WenPipeline:
    """A diffusers pipeline with Wen's mitigation before every call; every other attribute is the pipeline's."""

    def __init__(self, pipe, settings: WenSettings):
        if settings.target is None:
            raise MemPruneError("Wen's mitigation needs a target noise norm: give --wen-target or calibrate one with "
                                "memprune.methods.wen.calibrate_target.")
        self.__dict__["pipe"] = pipe
        self.__dict__["settings"] = settings
        self.__dict__["records"] = []  # one WenRecord per generated image, in call order

    def __getattr__(self, name):
        return getattr(self.__dict__["pipe"], name)

    def _call(self, prompt=None, num_inference_steps: int = 50, guidance_scale: float | None = None, generator=None,
              negative_prompt=None, height: int | None = None, width: int | None = None, **kwargs):
        from ..generate import default_guidance_scale

        pipe = self.pipe
        guidance = default_guidance_scale(pipe) if guidance_scale is None else float(guidance_scale)
        if guidance <= 1.0:
            raise MemPruneError("Wen's mitigation needs classifier-free guidance: use a guidance scale above 1.")
        if prompt is None or "prompt_embeds" in kwargs:
            raise MemPruneError("Wen's mitigation encodes the prompt itself: pass prompt text, not prompt_embeds.")
        if kwargs.get("num_images_per_prompt", 1) != 1:
            raise MemPruneError("Wen's mitigation optimises one embedding per image: use num_images_per_prompt 1.")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompts)
        default_height, default_width = default_size(pipe)
        size = (height or default_height, width or default_width)
        generators = _generators(generator, len(prompts))
        with gradients_enabled(), frozen(*pipeline_modules(pipe)):
            conditioning = encode(pipe, prompts, negative_prompt, size).detached()
            pipe.scheduler.set_timesteps(num_inference_steps, device=denoiser(pipe).device)
            t = pipe.scheduler.timesteps[0]
            latents = initial_latents(pipe, generators, len(prompts), size, conditioning.cond.dtype)
            latents_in = scaled_input(pipe.scheduler, latents, t)
            optimised, records = optimise_embeddings(pipe, prompts, conditioning, latents_in, t, self.settings)
        self.records.extend(records)
        return pipe(num_inference_steps=num_inference_steps, guidance_scale=guidance, generator=generators,
                    height=size[0], width=size[1], **pipeline_kwargs(conditioning, optimised), **kwargs)


def wrap(pipe, settings: WenSettings):
    """A callable with the pipeline's own call signature (so memprune.generate reads its default guidance scale)."""
    require_cfg_pipeline(pipe, "Wen's mitigation")
    signature = inspect.signature(type(pipe).__call__)

    def __call__(self, *args, **kwargs):
        return WenPipeline._call(self, *args, **kwargs)

    # a function takes any attribute, and inspect.signature reads this one (mypy does not model function attributes)
    __call__.__signature__ = signature  # type: ignore[attr-defined]
    __call__.__doc__ = "The pipeline's call, after Wen's optimisation of the prompt embeddings."
    cls = type(f"Wen{type(pipe).__name__}", (WenPipeline,), {"__call__": __call__})
    return cls(pipe, settings)


# --------------------------------------------------------------------------------------------- target

def first_step_norms(pipe, prompts: list[str], steps: int, seeds: list[int], guidance_scale: float,
                     batch_size: int = 8, size: tuple[int, int] | None = None) -> np.ndarray:
    """(prompts, seeds) first-step text-conditional noise norms, x_T drawn as memprune.generate draws it per seed,
    at `size` (height, width; default the pipeline's)."""
    if guidance_scale <= 1.0:
        raise MemPruneError("Wen's mitigation needs classifier-free guidance: use a guidance scale above 1.")
    require_cfg_pipeline(pipe, "Wen's mitigation")
    values = np.zeros((len(prompts), len(seeds)))
    size = size or default_size(pipe)
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            conditioning = encode(pipe, batch, None, size)  # a pipeline call: set the timesteps after it
            pipe.scheduler.set_timesteps(steps, device=denoiser(pipe).device)
            t = pipe.scheduler.timesteps[0]
            rows = list(range(len(batch)))
            for column, seed in enumerate(seeds):
                generators = [torch.Generator("cpu").manual_seed(seed) for _ in batch]
                latents = initial_latents(pipe, generators, len(batch), size, conditioning.cond.dtype)
                norms = _noise_norms(pipe, scaled_input(pipe.scheduler, latents, t), t, conditioning.cond, conditioning,
                                     rows)
                values[start : start + len(batch), column] = norms.cpu().numpy()
    return values


def calibrate_target(pipe, prompts: list[str], steps: int, seeds: list[int], guidance_scale: float,
                     quantile: float = 0.5, size: tuple[int, int] | None = None) -> float:
    """The default target: this quantile (median) of the first-step noise norms of non-memorized prompts."""
    if not prompts:
        raise MemPruneError("No non-memorized prompts to calibrate Wen's target noise norm on: give --wen-target.")
    return float(np.quantile(first_step_norms(pipe, prompts, steps, seeds, guidance_scale, size=size), quantile))
