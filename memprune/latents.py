"""Latents for the diffusion loss: images into the denoiser's latent space and the denoiser's training target.

Shared by the fine-tuning loop (memprune.finetune) and the DoRI-style attack (memprune.attack), which both train on
x_t = add_noise(x_0, ε, t) (or flow matching's straight path) against what the denoiser was trained to predict.
"""
from __future__ import annotations

import torch

from .errors import MemPruneError


def vae_encode(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """x_0 of (N, 3, H, W) pixels in [-1, 1]: the VAE encoder's posterior mean, shifted and scaled as the pipeline
    decodes it ((mean - shift_factor) * scaling_factor), without gradients."""
    vae = pipe.vae
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    with torch.no_grad():
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
    return (latents - shift) * float(vae.config.scaling_factor)


def prediction_kind(scheduler) -> str:
    """The scheduler's prediction type: "flow" for a flow-matching scheduler (SD3, Flux: the denoiser predicts the
    velocity ε − x_0), else its config's prediction_type (epsilon when the config does not say)."""
    if type(scheduler).__name__.startswith("FlowMatch"):
        return "flow"
    return getattr(scheduler.config, "prediction_type", "epsilon")


def noised(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t for integer training timesteps t: the scheduler's add_noise, or for flow matching the straight path
    (1 − σ)·x_0 + σ·ε with σ = t / num_train_timesteps (the timestep the denoiser is given is σ·T = t, as in the
    pipeline; σ is not shifted: training draws it uniformly)."""
    if prediction_kind(scheduler) != "flow":
        return scheduler.add_noise(x0, noise, t)
    sigma = (t.to(x0.device, torch.float32) / scheduler.config.num_train_timesteps).view(-1, *([1] * (x0.dim() - 1)))
    return ((1 - sigma) * x0 + sigma * noise).to(x0.dtype)


def prediction_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the denoiser predicts at x_t = noised(x_0, noise, t): ε, v (get_velocity), x_0 or the flow velocity
    ε − x_0, by prediction type."""
    kind = prediction_kind(scheduler)
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t.to(x0.device))
    if kind == "sample":
        return x0
    if kind == "flow":
        return noise - x0
    raise MemPruneError(f"Unsupported prediction type '{kind}' of the pipeline's scheduler.")
