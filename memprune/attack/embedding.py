"""The DoRI-style attack on one prompt: a bounded perturbation of its text embedding toward its training image.

Kowalczuk, Hintersdorf, Struppek et al. (arXiv 2507.16880, "Finding Dori") showed that pruning-based mitigations
(NeMo, Wanda) hide memorized images from the original prompt while a small change of the prompt's *text embedding*
brings the copy back. For a memorized prompt with a known training image, on one model:

1. encode the prompt (token embeddings e, as the pipeline would) and the training image x_0 (VAE encoder mean times
   the VAE scaling factor, the image resized to the pipeline's default size);
2. optimise a perturbation δ of the token embeddings (all tokens; SDXL's pooled embedding and time ids stay as
   encoded) with Adam (lr ``attack_lr``, torch defaults otherwise) for ``attack_steps`` steps on the denoising
   (training) loss of the image: per step ``noise_samples`` pairs (t ~ U{0..T-1}, ε ~ N(0, I)), the mean squared error
   between the denoiser's prediction for x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε under e + δ and its target (ε, or the velocity
   for v-prediction models). t and ε come from a CPU generator seeded with ``attack_seed``, the same draws for every
   prompt and model, so the attack is deterministic and every model faces the same budget;
3. after every step project δ onto the ball ‖δ‖₂ ≤ ``bound`` · ‖e‖₂ (Frobenius norm over tokens and channels: a
   *relative* budget, because embedding scales differ between text encoders);
4. generate with fresh seeds from e + δ (attacked) and from e (baseline, the zero-step attack), the negative prompt
   embedding as the pipeline computes it (memprune.attack.run scores them).

Defaults (cheap enough for the embedded testbed on a CPU; an attack on 10 prompts takes minutes per model):
``attack_steps`` 50, ``attack_lr`` 0.01, ``noise_samples`` 4, ``bound`` 0.25. The objective (the denoising loss of
the memorized image under a perturbed text embedding) follows DoRI's description; their code and exact budget
(optimiser settings, steps, norm constraint on SD v1.4) were not available to us, so these values are our choice,
sized for the testbed: on it, 50 steps move the embedding by about 0.15 (unedited) to 0.2 (Wanda prune, ratio 0.1)
of its norm, inside the bound, and bring the pruned model's held-out copies back.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

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


@dataclass
class AttackSettings:
    attack_steps: int = 50  # Adam steps on δ
    attack_lr: float = 0.01  # Adam learning rate
    bound: float = 0.25  # ‖δ‖₂ ≤ bound · ‖e‖₂
    noise_samples: int = 4  # (t, ε) draws per step
    attack_seed: int = 0  # seeds the (t, ε) draws

    def __post_init__(self):
        if self.attack_steps < 0:
            raise MemPruneError(f"--attack-steps must be 0 or more, got {self.attack_steps}.")
        if not self.attack_lr > 0:
            raise MemPruneError(f"--attack-lr must be positive, got {self.attack_lr}.")
        if not self.bound >= 0:
            raise MemPruneError(f"--bound must be 0 or more, got {self.bound}.")
        if self.noise_samples < 1:
            raise MemPruneError(f"--noise-samples must be at least 1, got {self.noise_samples}.")


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
    delta: torch.Tensor  # (1, T, D) the perturbation of the token embeddings
    loss_before: float  # the objective at δ = 0 on the scoring draw
    loss_after: float  # at the final δ, same draw
    losses: list[float]  # the objective at every step (its own draw)
    relative_norm: float  # ‖δ‖ / ‖e‖
    seconds: float


def attack_prompt(pipe, prompt: str, image: torch.Tensor, settings: AttackSettings,
                  conditioning: Conditioning | None = None) -> AttackResult:
    """Optimise δ for one prompt on `pipe` (module docstring, steps 1–3). No weight changes or gets a gradient."""
    tic = time.perf_counter()
    with gradients_enabled(), frozen(*pipeline_modules(pipe)):
        conditioning = (conditioning or encode(pipe, [prompt])).detached()
        x0 = encode_image(pipe, image).detach().clone()
        draws = noise_draws(pipe, settings, x0.shape[1:])
        embedding = conditioning.cond
        radius = settings.bound * float(embedding.norm())
        delta = torch.zeros_like(embedding, requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=settings.attack_lr)
        losses = []
        for t, noise in draws[:-1]:
            loss = denoising_loss(pipe, x0, embedding + delta, conditioning, t, noise)
            losses.append(float(loss.detach()))
            (gradient,) = torch.autograd.grad(loss, [delta])
            delta.grad = gradient
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                delta.copy_(project(delta, radius))
            check_finite(delta, [prompt], "adversarial embedding")
        delta = delta.detach()
        with torch.no_grad():
            t, noise = draws[-1]
            before = float(denoising_loss(pipe, x0, embedding, conditioning, t, noise))
            after = float(denoising_loss(pipe, x0, embedding + delta, conditioning, t, noise))
    relative = float(delta.norm() / embedding.norm()) if float(embedding.norm()) > 0 else 0.0
    return AttackResult(delta, before, after, losses, relative, time.perf_counter() - tic)


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

