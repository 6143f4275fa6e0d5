"""The DoRI attack on one prompt: optimise a continuous text embedding toward the prompt's training image.

Kowalczuk, Hintersdorf, Struppek et al. (arXiv 2507.16880, "Finding DoRI") showed that pruning-based mitigations
(NeMo, Wanda) hide memorized images from the original prompt while an optimised *text embedding* brings the copy
back. For a prompt with a known training image, on one model:

1. encode the prompt (token embeddings e, as the pipeline would) and the training image x_0 (VAE encoder mean times
   the VAE scaling factor, the image resized to the pipeline's default size);
2. start from s (``init``): ``prompt`` s = e (DoRI's default); ``noise`` s = Gaussian noise scaled to e's RMS
   (so ‖s‖ ≈ ‖e‖; seeded with ``attack_seed`` + NOISE_SEED_OFFSET); ``other`` s = the token embeddings of another,
   non-memorized prompt (``other``, chosen by the caller: memprune.attack.run names it in its notes);
3. optimise x = s + δ (all tokens; SDXL's pooled embedding and time ids stay as encoded for the prompt) with Adam
   (lr ``attack_lr``, torch defaults otherwise) for ``attack_steps`` steps on the denoising (training) loss of the
   image: per step ``noise_samples`` fresh pairs (t ~ U{0..T-1}, ε ~ N(0, I)), the mean squared error between the
   denoiser's prediction for x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε under x and its target. t and ε come from a CPU generator
   seeded with ``attack_seed``, the same draws for every prompt and model, so every model faces the same budget;
4. only with ``bound``: after every step project δ onto the ball ‖δ‖₂ ≤ bound · ‖s‖₂ (Frobenius norm over tokens and
   channels, relative because embedding scales differ between text encoders). DoRI describes no bound; the bound
   was this module's default before it followed DoRI and stays as an option;
5. keep x at the requested ``checkpoints`` (steps) for the attack-budget curve;
6. generate with fresh seeds from x (attacked) and from e (baseline); memprune.attack.run scores them.

Defaults are DoRI's (FIELD-NOTES: Adam lr 0.1, a batch of 8 fresh (t, ε) draws per step, 50 steps, no norm bound,
started from the prompt's embedding). Where this differs from DoRI and why: the target is the scheduler's
training target (ε on ε-models, as DoRI on SD 1.4; the velocity on v-prediction models such as the v-testbed,
because that is the loss those models were trained on); the draws are seeded (deterministic, and the same for every
model) where DoRI's are not; DoRI's code (sprintml/finding_dori) was not read, so details beyond the paper's
settings (e.g. whether t is sampled uniformly) are this module's choice.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..conditioning import (
    Conditioning,
    check_finite,
    encode,
    expand_rows,
    frozen,
    gradients_enabled,
    pipeline_kwargs,
    predict_noise,
)
from ..errors import MemPruneError
from ..generate import GenerationSettings, guidance_scale, pipeline_call_kwargs
from ..latents import noised, prediction_kind, prediction_target, vae_encode
from ..models import pipeline_modules

INITS = ("prompt", "noise", "other")
NOISE_SEED_OFFSET = 7919  # the noise start's generator: attack_seed + this, apart from the (t, ε) draws' generator


@dataclass
class AttackSettings:
    attack_steps: int = 50  # Adam steps (DoRI: 50)
    attack_lr: float = 0.1  # Adam learning rate (DoRI: 0.1)
    bound: float | None = None  # only when given: ‖δ‖₂ ≤ bound · ‖s‖₂ (DoRI: no bound)
    noise_samples: int = 8  # fresh (t, ε) draws per step (DoRI: a batch of 8)
    attack_seed: int = 0  # seeds the (t, ε) draws (and the noise start)
    init: str = "prompt"  # the start s: prompt, noise or other (module docstring, step 2)
    checkpoints: tuple[int, ...] = ()  # steps at which the attacked embedding is kept (attack-budget curve)

    def __post_init__(self):
        if self.attack_steps < 0:
            raise MemPruneError(f"--attack-steps must be 0 or more, got {self.attack_steps}.")
        if not (self.attack_lr > 0 and math.isfinite(self.attack_lr)):
            raise MemPruneError(f"--attack-lr must be a positive finite number, got {self.attack_lr}.")
        if self.bound is not None and not (self.bound >= 0 and math.isfinite(self.bound)):
            raise MemPruneError(f"--bound must be a finite number, 0 or more, got {self.bound}.")
        if self.noise_samples < 1:
            raise MemPruneError(f"--noise-samples must be at least 1, got {self.noise_samples}.")
        if self.init not in INITS:
            raise MemPruneError(f"--init must be one of {', '.join(INITS)}, got '{self.init}'.")
        self.checkpoints = tuple(sorted({int(k) for k in self.checkpoints}))
        if any(k < 0 or k > self.attack_steps for k in self.checkpoints):
            raise MemPruneError(f"Attack-budget checkpoints must lie in 0..--attack-steps ({self.attack_steps}), got "
                                f"{', '.join(map(str, self.checkpoints))}.")


def encode_image(pipe, image: torch.Tensor) -> torch.Tensor:
    """x_0 of a (3, H, W) image in [0, 1]: the VAE encoder's mean, shifted and scaled as the pipeline decodes it."""
    vae = pipe.vae
    return vae_encode(pipe, image[None].to(vae.device, vae.dtype) * 2 - 1)


def noise_draws(pipe, settings: AttackSettings, shape) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The attack's (t, ε) per step, from a CPU generator seeded with attack_seed (steps + 1: the last one scores)."""
    generator = torch.Generator("cpu").manual_seed(settings.attack_seed)
    total = pipe.scheduler.config.num_train_timesteps
    draws = []
    for _ in range(settings.attack_steps + 1):
        t = torch.randint(0, total, (settings.noise_samples,), generator=generator)
        noise = torch.randn((settings.noise_samples, *shape), generator=generator)
        draws.append((t, noise))
    return draws


def denoising_loss(pipe, x0: torch.Tensor, cond: torch.Tensor, conditioning: Conditioning, t: torch.Tensor,
                   noise: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the denoiser's prediction of x_t = add_noise(x_0, ε, t) against its training target."""
    scheduler = pipe.scheduler
    device, dtype = x0.device, x0.dtype
    t, noise = t.to(device), noise.to(device, dtype)
    x0 = x0.expand(len(t), *x0.shape[1:])
    prediction_type = prediction_kind(scheduler)
    if prediction_type not in ("epsilon", "v_prediction", "flow"):
        raise MemPruneError(f"The scheduler's prediction type '{prediction_type}' is not supported by the attack "
                            "(epsilon, v_prediction or flow matching).")
    noisy = noised(scheduler, x0, noise, t)
    target = prediction_target(scheduler, x0, noise, t)
    prediction = predict_noise(pipe, noisy, t, expand_rows(conditioning.with_cond(cond), len(t)))
    return torch.nn.functional.mse_loss(prediction.float(), target.float())


def project(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """δ scaled back onto the ball ‖δ‖₂ ≤ radius (unchanged inside it)."""
    norm = delta.norm()
    return delta * (radius / norm) if norm > radius else delta


@dataclass
class AttackResult:
    delta: torch.Tensor  # (1, T, D) the attacked embedding minus the prompt's embedding e (attacked = e + delta)
    loss_before: float  # the objective at the prompt's embedding e on the scoring draw
    loss_after: float  # at the attacked embedding, same draw
    losses: list[float]  # the objective at every step (its own draw)
    relative_norm: float  # ‖x − s‖ / ‖s‖: how far the optimiser moved from its start
    seconds: float
    checkpoints: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> attacked embedding minus e


def start_embedding(pipe, embedding: torch.Tensor, settings: AttackSettings, other: str | None) -> torch.Tensor:
    """The start s of step 2 of the module docstring (same shape as the prompt's token embeddings `embedding`)."""
    if settings.init == "prompt":
        return embedding
    if settings.init == "noise":
        generator = torch.Generator("cpu").manual_seed(settings.attack_seed + NOISE_SEED_OFFSET)
        noise = torch.randn(embedding.shape, generator=generator, dtype=torch.float32)
        rms = float(embedding.float().pow(2).mean().sqrt())
        return (noise * rms / float(noise.pow(2).mean().sqrt())).to(embedding)
    if other is None:
        raise MemPruneError("--init other needs a non-memorized prompt to start from; none was given.")
    with torch.no_grad():
        start = encode(pipe, [other]).cond.to(embedding)
    if start.shape != embedding.shape:
        raise MemPruneError(f"The --init other prompt '{other}' encodes to {tuple(start.shape)} token embeddings, the "
                            f"attacked prompt to {tuple(embedding.shape)}: give a prompt of the same token count.")
    return start


def attack_prompt(pipe, prompt: str, image: torch.Tensor, settings: AttackSettings,
                  conditioning: Conditioning | None = None, other: str | None = None) -> AttackResult:
    """Optimise the embedding for one prompt on `pipe` (module docstring, steps 1–5; `other` is the start of
    ``init="other"``). No weight changes or gets a gradient."""
    tic = time.perf_counter()
    with gradients_enabled(), frozen(*pipeline_modules(pipe)):
        conditioning = (conditioning or encode(pipe, [prompt])).detached()
        x0 = encode_image(pipe, image).detach().clone()
        draws = noise_draws(pipe, settings, x0.shape[1:])
        embedding = conditioning.cond
        start = start_embedding(pipe, embedding, settings, other).detach()
        radius = None if settings.bound is None else settings.bound * float(start.norm())
        delta = torch.zeros_like(start, requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=settings.attack_lr)
        losses = []
        kept = {0: start - embedding} if 0 in settings.checkpoints else {}
        for step, (t, noise) in enumerate(draws[:-1], start=1):
            loss = denoising_loss(pipe, x0, start + delta, conditioning, t, noise)
            losses.append(float(loss.detach()))
            (gradient,) = torch.autograd.grad(loss, [delta])
            delta.grad = gradient
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if radius is not None:
                with torch.no_grad():
                    delta.copy_(project(delta, radius))
            check_finite(delta, [prompt], "adversarial embedding")
            if step in settings.checkpoints:
                kept[step] = (start + delta).detach() - embedding
        delta = delta.detach()
        with torch.no_grad():
            t, noise = draws[-1]
            before = float(denoising_loss(pipe, x0, embedding, conditioning, t, noise))
            after = float(denoising_loss(pipe, x0, start + delta, conditioning, t, noise))
    relative = float(delta.norm() / start.norm()) if float(start.norm()) > 0 else 0.0
    return AttackResult((start + delta) - embedding, before, after, losses, relative, time.perf_counter() - tic, kept)


def generate_from_embeddings(pipe, conditioning: Conditioning, cond: torch.Tensor, generation: GenerationSettings,
                             size: tuple[int, int]) -> torch.Tensor:
    """(seeds, 3, H, W) images in [0, 1] of one prompt embedding, one CPU generator per seed (as memprune.generate)."""
    seeds = list(range(generation.seed, generation.seed + generation.seeds))
    batch = conditioning.repeated(len(seeds), cond)
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    with torch.inference_mode():
        output = pipe(num_inference_steps=generation.steps, guidance_scale=guidance_scale(pipe, generation),
                      generator=generators, output_type="pt", **pipeline_kwargs(batch),
                      **pipeline_call_kwargs(pipe, GenerationSettings(height=size[0], width=size[1])))
    return output.images.detach().to("cpu", torch.float32).clamp(0, 1)

