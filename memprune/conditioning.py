"""Text conditioning as tensors: what the prompt-embedding methods (Wen's mitigation, the DoRI-style attack) share.

Both methods encode a prompt once, change its embedding with gradients, and then call the stock pipeline with
``prompt_embeds``/``negative_prompt_embeds``. This module hides the difference between SD 1.x/2.x (one text encoder)
and SDXL (two encoders, a pooled embedding and the ``text_time`` added conditioning), so that the methods optimise
the token embeddings the same way on every pipeline; SDXL's pooled embedding and time ids are kept fixed.

The denoiser is called through ``unet.forward`` rather than ``unet(...)``: the optimisation passes are not part of
the sampling path, so forward hooks registered on the denoiser itself (memprune.detect's NoiseNormRecorder) must not
count them. Hooks inside the denoiser (on its submodules) still fire.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .errors import MemPruneError
from .models import denoiser
from .trace import Trace


@dataclass
class Conditioning:
    cond: torch.Tensor  # (B, T, D) token embeddings of the prompts
    uncond: torch.Tensor  # (B, T, D) of the negative (empty) prompt, as the pipeline would use them
    pooled: torch.Tensor | None = None  # SDXL: (B, P) pooled embedding of the prompts
    uncond_pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None  # SDXL: (1, 6) added time ids (original size, crop, target size)

    def detached(self) -> "Conditioning":
        """A copy of plain (not inference-mode) tensors without history, safe to use under autograd."""
        copy = lambda x: None if x is None else x.detach().clone()  # noqa: E731
        return Conditioning(copy(self.cond), copy(self.uncond), copy(self.pooled), copy(self.uncond_pooled),
                            copy(self.time_ids))


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None or getattr(pipe, "tokenizer_2", None) is not None


def default_size(pipe) -> tuple[int, int]:
    """The pipeline's default (height, width) in pixels: the denoiser's sample size times the VAE scale factor."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return (size, size) if isinstance(size, int) else tuple(size)


def encode(pipe, prompts: list[str], negative_prompt=None, size: tuple[int, int] | None = None) -> Conditioning:
    """Encode prompts (one embedding per prompt) and the negative prompt exactly as the pipeline's own call would."""
    device = pipe.unet.device
    if is_sdxl(pipe):
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=negative_prompt)
        height, width = size or default_size(pipe)
        projection = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                      else pipe.text_encoder_2.config.projection_dim)
        time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=cond.dtype,
                                          text_encoder_projection_dim=projection).to(device)
        return Conditioning(cond, uncond, pooled, uncond_pooled, time_ids)
    cond, uncond = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                      do_classifier_free_guidance=True, negative_prompt=negative_prompt)
    return Conditioning(cond, uncond)


def predict_noise(pipe, latents: torch.Tensor, timestep, embeds: torch.Tensor, pooled: torch.Tensor | None = None,
                  time_ids: torch.Tensor | None = None) -> torch.Tensor:
    """ε(latents, t, embeds) of the denoiser (scaled model input expected); SDXL gets its added conditioning."""
    kwargs = {}
    if pooled is not None:
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids.expand(len(latents), -1)}
    output = pipe.unet.forward(latents, timestep, encoder_hidden_states=embeds, return_dict=False, **kwargs)
    return output[0]


def text_noise_norm(eps: torch.Tensor) -> torch.Tensor:
    """‖ε(x, c) − ε(x, ∅)‖₂ per sample (norm over C, H, W) of a classifier-free-guidance prediction batched as
    [unconditional, conditional]: Wen et al.'s detection score and the quantity their mitigation lowers."""
    uncond, cond = eps.float().chunk(2)
    return (cond - uncond).flatten(1).norm(dim=1)


def pipeline_kwargs(conditioning: Conditioning, cond: torch.Tensor | None = None) -> dict:
    """The keyword arguments that make the pipeline use these embeddings (optionally replacing the prompt's)."""
    kwargs = {"prompt_embeds": conditioning.cond if cond is None else cond,
              "negative_prompt_embeds": conditioning.uncond}
    if conditioning.pooled is not None:
        kwargs["pooled_prompt_embeds"] = conditioning.pooled
        kwargs["negative_pooled_prompt_embeds"] = conditioning.uncond_pooled
    return kwargs


@contextlib.contextmanager
def frozen(*modules: nn.Module):
    """Gradients flow to the inputs only: every parameter has requires_grad False inside, restored on exit."""
    flags = [(p, p.requires_grad) for module in modules if module is not None for p in module.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


@contextlib.contextmanager
def gradients_enabled():
    """Autograd on, also when the caller runs under torch.inference_mode (memprune.generate) or no_grad."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def check_finite(tensor: torch.Tensor, prompts: list[str], what: str) -> None:
    """Stop with the prompt whose optimised embedding holds NaN or inf."""
    bad = ~torch.isfinite(tensor.detach()).flatten(1).all(dim=1)
    if bad.any():
        index = int(bad.nonzero()[0])
        raise MemPruneError(f"The {what} of prompt '{prompts[index]}' became NaN or inf: lower the learning rate "
                            "or check the model.")


def capture_conditioning(pipe, prompts: list[str], guidance_scale: float) -> tuple[tuple, dict]:
    """The (sample, timestep) and keyword arguments of the pipeline's first denoiser call for `prompts`.

    The pipeline is called and stopped at its first denoiser call, so its own prompt encoding (CFG layout
    [uncond, cond], SDXL pooled embeddings and time ids, a DiT's attention masks or pooled projections) is reused
    without per-architecture code.
    """
    progress_config = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    try:
        with Trace(denoiser(pipe), retain_input=True, stop=True, detach=False) as trace:
            pipe(prompt=list(prompts), num_inference_steps=1, guidance_scale=guidance_scale, output_type="latent",
                 generator=torch.Generator("cpu").manual_seed(0))
    finally:
        pipe._progress_bar_config = progress_config
    if "" not in trace.input:
        raise MemPruneError("The pipeline finished without calling its denoiser: cannot capture its conditioning.")
    args, kwargs = trace.input[""]
    return args, {k: v for k, v in kwargs.items() if k not in ("sample", "timestep", "return_dict")}
