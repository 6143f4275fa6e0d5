"""A denoiser's output as an ε-prediction, through its scheduler's config: the one conversion every first-step
quantity uses (NeMo's noise difference, Wen et al.'s text-conditional noise norm and memprune detect's score).

The references compute these quantities on Stable Diffusion 1.x, an ε-model, where the output *is* ε̂. A model
trained for another target gives ε̂ only after converting, with ᾱ = alphas_cumprod[t] and x_t the denoiser's
(scaled) input, which is the variance-preserving x_t = √ᾱ·x_0 + √(1−ᾱ)·ε for every alphas_cumprod scheduler
(DDIM/DDPM/PNDM take x as it is; Euler-type schedulers divide it by √(σ²+1), which gives the same x_t):

- ``epsilon``: ε̂ = output;
- ``v_prediction`` (v = √ᾱ·ε − √(1−ᾱ)·x_0): ε̂ = √ᾱ·v + √(1−ᾱ)·x_t;
- ``sample`` (the output is x̂_0): ε̂ = (x_t − √ᾱ·x̂_0) / √(1−ᾱ).

With zero terminal SNR (ᾱ_T = 0, diffusers stores 2⁻²⁴) a v-model's ε̂ at t = T is x_T up to 2⁻¹² of the output: the
first-step quantities then carry almost no information from the prompt. That is the model's parametrization, not an
error of the conversion: these methods were designed on SD 1.x's (ε, non-zero terminal SNR).

A timestep between two integers (interpolating Euler schedules) takes ᾱ linearly interpolated between its
neighbours. Flow-matching schedulers (SD3) have no alphas_cumprod: their output (the velocity v = ε − x_0) is
returned as it is. There ε̂ = x_t + (1−σ_t)·v, so a difference of two predictions at one timestep (Wen's ε_c − ε_u)
is the velocity difference times (1−σ_t): the velocity keeps every ranking at one timestep. A learned-variance output
(PixArt: twice the latent channels) gives its first half, as the pipeline takes it.
"""
from __future__ import annotations

import torch

from .errors import MemPruneError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def prediction_type(scheduler) -> str:
    """The scheduler's prediction_type (diffusers' default: epsilon)."""
    config = getattr(scheduler, "config", {}) or {}
    return config.get("prediction_type", "epsilon") or "epsilon"


def alpha_bar(scheduler, timestep, batch: int) -> torch.Tensor | None:
    """ᾱ_t per sample (float64, shape (batch,)); None for a scheduler without alphas_cumprod (flow matching)."""
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        return None
    alphas = torch.as_tensor(alphas, dtype=torch.float64).cpu()
    t = torch.as_tensor(timestep, dtype=torch.float64).detach().cpu().flatten()
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise MemPruneError(f"{t.numel()} timesteps were given for a batch of {batch} predictions.")
    t = t.clamp(0, len(alphas) - 1)
    low, high = t.floor().long(), t.ceil().long()
    weight = t - low.double()
    return alphas[low] * (1 - weight) + alphas[high] * weight


def call_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, object]:
    """(x_t, timestep) of a denoiser call from its positional and keyword arguments (UNets: sample, DiTs:
    hidden_states)."""
    sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
    timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
    if not torch.is_tensor(sample):
        raise MemPruneError("The denoiser call holds no latent input (sample or hidden_states): cannot convert its "
                            "output to an ε-prediction.")
    return sample, timestep


def require_prompt_signal(scheduler, timestep, what: str) -> None:
    """Refuse a first-step quantity that cannot depend on the prompt: a v- or x_0-model at ᾱ_t = 0 (zero terminal
    SNR) predicts ε̂ = x_t exactly, whatever the text."""
    alpha = alpha_bar(scheduler, timestep, 1)
    if prediction_type(scheduler) != "epsilon" and alpha is not None and float(alpha[0]) == 0.0:
        raise MemPruneError(f"{what} is undefined on this model: its scheduler has zero terminal SNR (ᾱ = 0 at the "
                            f"first timestep {int(torch.as_tensor(timestep).flatten()[0])}), so its ε-prediction "
                            "there is x_T exactly, whatever the prompt. Use a model with SD 1.x's parametrization "
                            "(non-zero terminal SNR).")


def noise_prediction(output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """The prediction part of a denoiser output: a learned-variance output's first half (channels 2C -> C)."""
    if output.shape[1] == 2 * sample.shape[1]:
        return output.chunk(2, dim=1)[0]
    return output


def to_epsilon(output: torch.Tensor, sample: torch.Tensor, timestep, scheduler) -> torch.Tensor:
    """ε̂ from the denoiser's `output` at its input `sample` (x_t) and `timestep` (see the module docstring).

    Differentiable in `output` (Wen's optimisation takes its gradient through it); computed in the output's dtype
    with ᾱ from float64."""
    output = noise_prediction(output, sample)
    kind = prediction_type(scheduler)
    if kind == "epsilon":
        return output
    if kind not in PREDICTION_TYPES:
        raise MemPruneError(f"Unknown scheduler prediction_type '{kind}': memprune converts "
                            f"{', '.join(PREDICTION_TYPES)} predictions to ε.")
    alpha = alpha_bar(scheduler, timestep, output.shape[0])
    if alpha is None:  # flow matching: the velocity as it is (module docstring)
        return output
    shape = (-1,) + (1,) * (output.dim() - 1)
    root_a = alpha.sqrt().view(shape).to(output.device, output.dtype)
    root_1a = (1 - alpha).sqrt().view(shape).to(output.device, output.dtype)
    x = sample.to(output.dtype)
    if kind == "v_prediction":
        return root_a * output + root_1a * x
    return (x - root_a * output) / root_1a.clamp_min(1e-12)
