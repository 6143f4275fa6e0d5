"""Wen et al. (ICLR 2024) inference-time mitigation: optimise the prompt embedding at the first sampling step.

Their code (YuxinWenRick/diffusion_memorization, ``aug_prompt`` + ``inference_mem.py``) and memprune's default,
``mode="prompt"``, per prompt and before sampling:

1. encode the prompt and the negative (empty) prompt as the pipeline does (memprune.conditioning.encode: the
   keyword arguments of its own first denoiser call, so UNets and CFG DiTs such as PixArt and SD3 alike; a
   guidance-distilled pipeline such as Flux has no unconditional prediction and is refused);
2. draw the initial latents x_T of the prompt's n images (theirs: one call with num_images_per_prompt = 4; memprune:
   the n evaluation seeds, see WenPipeline), take the first timestep t_0 of the schedule;
3. one embedding e_p shared by the n images; at most ``max_iterations`` times: compute the loss
   ``L = ‖ε(x_T, t_0, e_p) − ε(x_T, t_0, e_∅)‖₂`` over the whole batch of n images (their ``torch.norm`` of the
   stacked text-conditional predictions, i.e. √(Σ_i ‖d_i‖²) with d_i the per-image difference); stop as soon as
   ``L <= target`` (checked before each step, theirs); else one AdamW step (torch defaults: betas 0.9/0.999, weight
   decay 0.01) on e_p with ``lr``. As theirs the first (BOS) token gets no gradient and the unconditional embedding
   stays fixed, so at most ``max_iterations`` denoiser passes (batch [e_∅ × n, e_p × n]) are added per prompt;
4. generate the n images with the stock pipeline from ``prompt_embeds = e_p*`` and ``negative_prompt_embeds = e_∅``
   (plus the family's pooled embeddings or attention masks as encoded), from the same x_T.

ε is the denoiser's output converted through the scheduler's prediction_type (memprune.prediction): on SD 1.x, an
ε-model, the output itself, as theirs; on a v-model the difference is √ᾱ_t times the v difference (zero at t = T with
zero terminal SNR); on flow-matching models (SD3) the velocity.

``mode="image"`` (``--wen-mode image``, memprune's earlier port): one embedding and one stop per image, the loss the
image's own ‖d_i‖. Groups (prompts or images) are optimised independently in one batched denoiser pass per iteration.
On SDXL the token embeddings (concatenated from both encoders) are optimised; the pooled embedding and the time ids
stay as encoded. No weight is changed and no weight gets a gradient: parameters have requires_grad False during the
optimisation (restored afterwards) and the gradient is taken with torch.autograd.grad with respect to the embeddings.

Target units. In per-prompt mode the loss is the *joint* norm over the prompt's n images: with equal per-image norms
d it is √n·d. Their scripts use ``--optim_target_loss 3`` with 4 images per prompt on SD v1.4 (64×64×4 latents), i.e.
about 1.5 per image; ``--wen-target 3`` with ``--seeds 4`` (per-prompt mode) is that setting on SD v1.4, and a
per-image target equivalent to a joint target T over n images is T/√n. The norm scales with the model and the latent
size, so memprune does not hard-code 3: without an explicit target, ``memprune evaluate --mitigation wen``
calibrates it in the same run, in the loss's units (``calibrate_target``): the median over the non-memorized
calibration prompts (the group that also calibrates the copy threshold) of the joint first-step norm over the
evaluation seeds (per-image mode: the median per-image norm).

Where the port differs: their x_T come from one generator for the prompt's whole batch; memprune's from one
generator per seed (memprune.generate), so a prompt's images do not depend on the batch they run in. The loop runs in
the pipeline's dtype (theirs: bfloat16 on GPU). Classifier-free guidance is required (the norm compares the two CFG
branches): guidance scale <= 1 is refused. An embedding that becomes NaN or inf stops the run with the prompt's text.
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
from ..prediction import require_prompt_signal, to_epsilon
from .base import MethodInfo

METHOD = MethodInfo(
    "wen", "mitigation",
    "Wen et al. ICLR 2024: per prompt, AdamW on its embedding (shared by its images) at the first step until the "
    "joint text-conditional noise norm of its images falls below a target, then generate",
    "Wen, Liu, Chen, Lyu. Detecting, Explaining, and Mitigating Memorization in Diffusion Models. ICLR 2024.",
)


WEN_MODES = ("prompt", "image")


@dataclass
class WenSettings:
    lr: float = 0.05  # AdamW learning rate on the token embeddings (Wen et al.)
    max_iterations: int = 10  # at most this many norm evaluations / steps per embedding (Wen et al.)
    target: float | None = None  # stop at or below this loss; None: calibrate (see calibrate_target)
    mode: str = "prompt"  # "prompt": one embedding per prompt, joint norm over its images (theirs); "image": per image

    def __post_init__(self):
        if not self.lr > 0:
            raise MemPruneError(f"--wen-lr must be positive, got {self.lr}.")
        if self.max_iterations < 1:
            raise MemPruneError(f"--wen-iterations must be at least 1, got {self.max_iterations}.")
        if self.target is not None and not self.target >= 0:
            raise MemPruneError(f"--wen-target must be 0 or more, got {self.target}.")
        if self.mode not in WEN_MODES:
            raise MemPruneError(f"Unknown --wen-mode '{self.mode}': use one of {', '.join(WEN_MODES)}.")


@dataclass
class WenRecord:
    """What the optimisation did for one generated image (in per-prompt mode: its prompt's shared embedding)."""
    prompt: str
    initial_norm: float  # loss of the original embedding (per-prompt mode: the joint norm over `images`)
    last_norm: float  # the last loss evaluated (at or below target when reached)
    iterations: int  # AdamW steps taken
    reached: bool  # the loss fell to the target
    images: int = 1  # images whose joint norm is the loss (1 in per-image mode)

    def metrics(self) -> dict[str, float]:
        """evaluate's per-image mitigation metrics (averaged per prompt group)."""
        return {"mitigation_iterations": float(self.iterations), "mitigation_target_reached": float(self.reached)}


def noise_norms(pipe, model_input, t, cond, conditioning: Conditioning, rows) -> torch.Tensor:
    """‖ε(x, t, e_p) − ε(x, t, e_∅)‖₂ per sample for the given rows, one batched [uncond, cond] pass, ε converted from
    the denoiser's output through the scheduler (memprune.prediction)."""
    x = model_input[rows]
    doubled = torch.cat([x, x])
    output = predict_noise(pipe, doubled, t, conditioning.cfg_kwargs(cond, rows))
    return text_noise_norm(to_epsilon(output, doubled, t, pipe.scheduler))


def joint_norms(norms: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """Per group of rows, the norm of their stacked predictions: √(Σ_i ‖d_i‖²) (Wen's torch.norm over the batch)."""
    return torch.stack([norms[group].pow(2).sum().sqrt() for group in groups])


def _generators(generator, count: int) -> list[torch.Generator] | torch.Generator:
    """A generator per image, or one generator for them all, passed on as it is (the pipeline draws from it)."""
    if generator is None:  # the pipeline would draw from the global RNG: fix seeds so both draws agree
        seeds = torch.randint(0, 2**62, (count,)).tolist()
        return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    if isinstance(generator, torch.Generator):
        return [generator] if count == 1 else generator
    if len(generator) != count:
        raise MemPruneError(f"{len(generator)} generators were given for {count} images.")
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
                        settings: WenSettings, groups: list[list[int]] | None = None,
                        ) -> tuple[torch.Tensor, list[WenRecord]]:
    """Wen's loop (module docstring): one embedding per group of rows (default: one per row), its loss the joint norm
    of the group's rows. Returns the optimised token embeddings (B, T, D), each row its group's, and one record per
    row (the group's)."""
    groups = [[i] for i in range(len(prompts))] if groups is None else groups
    target = settings.target
    leaves = [conditioning.cond[group[0] : group[0] + 1].clone().requires_grad_(True) for group in groups]
    optimizers = [torch.optim.AdamW([leaf], lr=settings.lr) for leaf in leaves]
    initial = [float("nan")] * len(groups)
    last = [float("nan")] * len(groups)
    steps = [0] * len(groups)
    reached = [False] * len(groups)
    active = list(range(len(groups)))
    for iteration in range(settings.max_iterations):
        rows = [row for g in active for row in groups[g]]
        cond = torch.cat([leaves[g].expand(len(groups[g]), -1, -1) for g in active])
        norms = noise_norms(pipe, model_input, t, cond, conditioning, rows)
        offsets, position = [], 0
        for g in active:
            offsets.append(list(range(position, position + len(groups[g]))))
            position += len(groups[g])
        losses = joint_norms(norms, offsets)
        values = losses.detach().cpu().tolist()
        still = []
        for index, g in enumerate(active):
            if iteration == 0:
                initial[g] = values[index]
            last[g] = values[index]
            if values[index] <= target:  # checked before the step (theirs)
                reached[g] = True
            else:
                still.append(index)
        if not still:
            break
        # groups are independent (the denoiser treats samples independently): each leaf gets its own loss's gradient
        gradients = torch.autograd.grad(losses[still].sum(), [leaves[active[i]] for i in still])
        for index, gradient in zip(still, gradients, strict=True):
            g = active[index]
            gradient = gradient.clone()
            gradient[:, 0] = 0  # the BOS token stays (Wen et al.)
            leaves[g].grad = gradient
            optimizers[g].step()
            optimizers[g].zero_grad(set_to_none=True)
            steps[g] += 1
            check_finite(leaves[g], [prompts[groups[g][0]]], "Wen-optimised prompt embedding")
        active = [active[i] for i in still]
    embeddings = torch.empty_like(conditioning.cond)
    records: list[WenRecord | None] = [None] * len(prompts)
    for g, group in enumerate(groups):
        record = WenRecord(prompts[group[0]], initial[g], last[g], steps[g], reached[g], len(group))
        for row in group:
            embeddings[row] = leaves[g].detach()[0]
            records[row] = record
    return embeddings, [record for record in records if record is not None]


def prompt_groups(prompts: list[str]) -> list[list[int]]:
    """Rows with the same prompt text, in order of first appearance (per-prompt mode: one embedding each)."""
    groups: dict[str, list[int]] = {}
    for row, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(row)
    return list(groups.values())


class WenPipeline:
    """A diffusers pipeline with Wen's mitigation before every call; every other attribute is the pipeline's.

    Per-prompt mode with `seeds` (what memprune.generate does: one call per seed, a fresh generator per image): a
    prompt's embedding is optimised once on the x_T of all `seeds` together and reused by each of its calls, so its
    images share one embedding as in Wen et al.'s one call with num_images_per_prompt. Without `seeds`, the images of
    one call with the same prompt text share one embedding, optimised on their own x_T."""

    def __init__(self, pipe, settings: WenSettings, seeds: list[int] | None = None):
        if settings.target is None:
            raise MemPruneError("Wen's mitigation needs a target noise norm: give --wen-target or calibrate one with "
                                "memprune.methods.wen.calibrate_target.")
        self.__dict__["pipe"] = pipe
        self.__dict__["settings"] = settings
        self.__dict__["seeds"] = None if seeds is None else list(seeds)
        self.__dict__["records"] = []  # one WenRecord per generated image, in call order
        self.__dict__["cache"] = {}  # per-prompt mode with seeds: (prompt, negative, steps, size) -> optimised

    def __getattr__(self, name):
        return getattr(self.__dict__["pipe"], name)

    def _optimise(self, prompts, negative_prompt, size, steps, generators):
        """(optimised embeddings, records, conditioning) of one call's images (one row per image)."""
        pipe = self.pipe
        with gradients_enabled(), frozen(*pipeline_modules(pipe)):
            conditioning = encode(pipe, prompts, negative_prompt, size).detached()
            pipe.scheduler.set_timesteps(steps, device=denoiser(pipe).device)
            t = pipe.scheduler.timesteps[0]
            require_prompt_signal(pipe.scheduler, t, "Wen's first-step noise norm")
            latents = initial_latents(pipe, generators, len(prompts), size, conditioning.cond.dtype)
            if self.settings.mode == "prompt" and self.seeds is not None:
                optimised, records = self._from_cache(prompts, negative_prompt, size, steps, latents, conditioning)
            else:
                groups = prompt_groups(prompts) if self.settings.mode == "prompt" else None
                optimised, records = optimise_embeddings(pipe, prompts, conditioning,
                                                         scaled_input(pipe.scheduler, latents, t), t, self.settings,
                                                         groups)
        return optimised, records, conditioning

    def _from_cache(self, prompts, negative_prompt, size, steps, latents, conditioning):
        """Per-prompt mode with seeds: each prompt's embedding optimised once on the x_T of all seeds."""
        pipe, seeds = self.pipe, self.seeds
        rows, records = [], []
        for row, prompt in enumerate(prompts):
            negative = negative_prompt[row] if isinstance(negative_prompt, list) else negative_prompt
            key = (prompt, negative, steps, size)
            if key not in self.cache:
                single = encode(pipe, [prompt], None if negative is None else [negative], size).detached()
                batch = single.repeated(len(seeds))
                pipe.scheduler.set_timesteps(steps, device=denoiser(pipe).device)
                t = pipe.scheduler.timesteps[0]
                fresh = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
                x = initial_latents(pipe, fresh, len(seeds), size, single.cond.dtype)
                embedding, batch_records = optimise_embeddings(pipe, [prompt] * len(seeds), batch,
                                                               scaled_input(pipe.scheduler, x, t), t, self.settings,
                                                               [list(range(len(seeds)))])
                self.cache[key] = (embedding[:1], batch_records[0], x)
            embedding, record, x = self.cache[key]
            matches = [i for i in range(len(seeds)) if torch.equal(x[i], latents[row])]
            if not matches:
                raise MemPruneError(f"Wen's per-prompt embedding of '{prompt}' was optimised on seeds {seeds}, and "
                                    "this image's generator draws another x_T: generate with those seeds (a fresh "
                                    "generator per image).")
            rows.append(embedding.to(conditioning.cond.dtype))
            records.append(record)
        return torch.cat(rows), records

    def _call(self, prompt=None, num_inference_steps: int = 50, guidance_scale: float | None = None, generator=None,
              negative_prompt=None, height: int | None = None, width: int | None = None, **kwargs):
        from ..generate import default_guidance_scale

        pipe = self.pipe
        guidance = default_guidance_scale(pipe) if guidance_scale is None else float(guidance_scale)
        if guidance <= 1.0:
            raise MemPruneError("Wen's mitigation needs classifier-free guidance: use a guidance scale above 1.")
        if prompt is None or "prompt_embeds" in kwargs:
            raise MemPruneError("Wen's mitigation encodes the prompt itself: pass prompt text, not prompt_embeds.")
        per_prompt = int(kwargs.pop("num_images_per_prompt", 1) or 1)
        prompts = [text for text in ([prompt] if isinstance(prompt, str) else list(prompt)) for _ in range(per_prompt)]
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompts)
        elif negative_prompt is not None:
            negative_prompt = [text for text in negative_prompt for _ in range(per_prompt)]
        default_height, default_width = default_size(pipe)
        size = (height or default_height, width or default_width)
        generators = _generators(generator, len(prompts))
        optimised, records, conditioning = self._optimise(prompts, negative_prompt, size, num_inference_steps,
                                                          generators)
        self.records.extend(records)
        return pipe(num_inference_steps=num_inference_steps, guidance_scale=guidance, generator=generators,
                    height=size[0], width=size[1], **pipeline_kwargs(conditioning, optimised), **kwargs)


def wrap(pipe, settings: WenSettings, seeds: list[int] | None = None):
    """A callable with the pipeline's own call signature (so memprune.generate reads its default guidance scale).
    `seeds`: in per-prompt mode, the seeds every prompt is generated with (see WenPipeline)."""
    require_cfg_pipeline(pipe, "Wen's mitigation")
    signature = inspect.signature(type(pipe).__call__)

    def __call__(self, *args, **kwargs):
        return WenPipeline._call(self, *args, **kwargs)

    # a function takes any attribute, and inspect.signature reads this one (mypy does not model function attributes)
    __call__.__signature__ = signature  # type: ignore[attr-defined]
    __call__.__doc__ = "The pipeline's call, after Wen's optimisation of the prompt embeddings."
    cls = type(f"Wen{type(pipe).__name__}", (WenPipeline,), {"__call__": __call__})
    return cls(pipe, settings, seeds)


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
            require_prompt_signal(pipe.scheduler, t, "Wen's first-step noise norm")
            rows = list(range(len(batch)))
            for column, seed in enumerate(seeds):
                generators = [torch.Generator("cpu").manual_seed(seed) for _ in batch]
                latents = initial_latents(pipe, generators, len(batch), size, conditioning.cond.dtype)
                norms = noise_norms(pipe, scaled_input(pipe.scheduler, latents, t), t, conditioning.cond, conditioning,
                                    rows)
                values[start : start + len(batch), column] = norms.cpu().numpy()
    return values


def calibrate_target(pipe, prompts: list[str], steps: int, seeds: list[int], guidance_scale: float,
                     quantile: float = 0.5, mode: str = "prompt", size: tuple[int, int] | None = None) -> float:
    """The default target, in the loss's own units: this quantile (median) over non-memorized prompts of the joint
    first-step norm over `seeds` (√(Σ_s ‖d_s‖²), per-prompt mode), or of the per-image norms (per-image mode), at
    `size` (height, width; default the pipeline's)."""
    if not prompts:
        raise MemPruneError("No non-memorized prompts to calibrate Wen's target noise norm on: give --wen-target.")
    norms = first_step_norms(pipe, prompts, steps, seeds, guidance_scale, size=size)
    values = np.sqrt((norms**2).sum(axis=1)) if mode == "prompt" else norms
    return float(np.quantile(values, quantile))
