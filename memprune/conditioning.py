"""Text conditioning as denoiser keyword arguments: one `Conditioning` for every denoiser (UNet or DiT) and method.

A `Conditioning` holds what the pipeline itself gives its denoiser for a list of prompts, captured at the pipeline's
first denoiser call (`capture_conditioning`): the token embeddings ``encoder_hidden_states`` plus whatever the
family adds (SDXL's pooled embedding and time ids, PixArt's attention mask, SD3's pooled projections), batched along
dim 0, and with classifier-free guidance the negative prompt's as well. So no method needs per-architecture code:
the prompt-embedding methods (Wen's mitigation, the DoRI-style attack) change ``cond`` (the token embeddings) with
gradients, call the denoiser through `predict_noise`, and then call the stock pipeline with `pipeline_kwargs`
(``prompt_embeds``/``negative_prompt_embeds`` and their pooled and mask companions); the fine-tuning loop
(memprune.finetune) trains on `select`ed rows. The other entries (pooled embeddings, time ids, masks) stay fixed.

The denoiser is called through ``forward`` rather than ``net(...)``: the optimisation passes are not part of the
sampling path, so forward hooks registered on the denoiser itself (memprune.detect's NoiseNormRecorder) must not
count them. Hooks inside the denoiser (on its submodules) still fire.

Guidance-distilled pipelines (Flux) have no unconditional branch: `encode` refuses them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import MemPruneError
from .models import denoiser
from .trace import Trace

STATES = "encoder_hidden_states"
# a denoiser call's own inputs, not conditioning
INPUT_KEYWORDS = ("sample", "hidden_states", "timestep", "return_dict")
# Denoiser keyword (a path into its kwargs) -> the pipeline's keywords for the prompt and the negative prompt.
PIPELINE_KEYWORDS = {
    (STATES,): ("prompt_embeds", "negative_prompt_embeds"),
    ("added_cond_kwargs", "text_embeds"): ("pooled_prompt_embeds", "negative_pooled_prompt_embeds"),  # SDXL
    ("pooled_projections",): ("pooled_prompt_embeds", "negative_pooled_prompt_embeds"),  # SD3
    ("encoder_attention_mask",): ("prompt_attention_mask", "negative_prompt_attention_mask"),  # PixArt
}


def rows_of(value, idx: torch.Tensor, n: int):
    """Rows `idx` of every tensor with n rows inside a (nested) keyword value; anything else as it is."""
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == n:
        return value[idx.to(value.device)]
    if isinstance(value, dict):
        return {k: rows_of(v, idx, n) for k, v in value.items()}
    return value


def expand_rows(value, n: int):
    """Every one-row tensor inside a (nested) keyword value repeated to n rows (a view); anything else as it is."""
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == 1:
        return value.expand(n, *value.shape[1:])
    if isinstance(value, dict):
        return {k: expand_rows(v, n) for k, v in value.items()}
    return value


def concatenated(values: list):
    """The batch of several keyword values: tensors concatenated along dim 0, dicts per key, others from the first."""
    first = values[0]
    if torch.is_tensor(first):
        return torch.cat(values)
    if isinstance(first, dict):
        return {k: concatenated([v[k] for v in values]) for k in first}
    return first


def _mapped(value, function):
    if torch.is_tensor(value):
        return function(value)
    if isinstance(value, dict):
        return {k: _mapped(v, function) for k, v in value.items()}
    return value


@dataclass
class Conditioning:
    """The denoiser keyword arguments of a list of prompts, batched along dim 0: `kwargs` for the prompts and, with
    classifier-free guidance, `uncond_kwargs` for the negative prompt (as the pipeline pairs them)."""

    kwargs: dict
    uncond_kwargs: dict | None = None
    prompts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.cond)

    @property
    def cond(self) -> torch.Tensor:
        """(B, T, D) token embeddings of the prompts."""
        return self.kwargs[STATES]

    @property
    def uncond(self) -> torch.Tensor:
        """(B, T, D) token embeddings of the negative prompt."""
        if self.uncond_kwargs is None:
            raise MemPruneError("This conditioning was encoded without classifier-free guidance: "
                                "it has no negative prompt.")
        return self.uncond_kwargs[STATES]

    def select(self, idx: torch.Tensor) -> dict:
        """The prompts' denoiser kwargs of rows `idx`."""
        return rows_of(self.kwargs, idx, len(self))

    def with_cond(self, cond: torch.Tensor, rows: list[int] | None = None) -> dict:
        """The prompts' denoiser kwargs (of `rows`, default all) with `cond` as their token embeddings."""
        kwargs = self.kwargs if rows is None else rows_of(self.kwargs, torch.tensor(rows), len(self))
        return {**kwargs, STATES: cond}

    def cfg_kwargs(self, cond: torch.Tensor, rows: list[int]) -> dict:
        """Denoiser kwargs of the classifier-free-guidance batch [negative prompt, `cond`] for `rows`."""
        uncond = rows_of(self.uncond_kwargs, torch.tensor(rows), len(self))
        if uncond is None:
            raise MemPruneError("This conditioning was encoded without classifier-free guidance: "
                                "it has no negative prompt.")
        return concatenated([uncond, self.with_cond(cond, rows)])

    def repeated(self, n: int, cond: torch.Tensor | None = None) -> Conditioning:
        """A one-prompt conditioning repeated to n rows (contiguous), optionally with other token embeddings."""
        def repeat(kwargs: dict) -> dict:
            return _mapped(expand_rows(kwargs, n), torch.Tensor.contiguous)

        kwargs = self.kwargs if cond is None else {**self.kwargs, STATES: cond}
        uncond = None if self.uncond_kwargs is None else repeat(self.uncond_kwargs)
        return Conditioning(repeat(kwargs), uncond, self.prompts * n)

    def detached(self) -> Conditioning:
        """A copy of plain (not inference-mode) tensors without history, safe to use under autograd."""
        def copy(kwargs: dict) -> dict:
            return _mapped(kwargs, lambda x: x.detach().clone())

        uncond = None if self.uncond_kwargs is None else copy(self.uncond_kwargs)
        return Conditioning(copy(self.kwargs), uncond, list(self.prompts))


def capture_conditioning(pipe, prompts: list[str], guidance_scale: float, **call_kwargs) -> tuple[tuple, dict]:
    """The (sample, timestep) and keyword arguments of the pipeline's first denoiser call for `prompts`.

    The pipeline is called and stopped at its first denoiser call, so its own prompt encoding (CFG layout
    [uncond, cond], SDXL pooled embeddings and time ids, a DiT's attention masks or pooled projections) is reused
    without per-architecture code. `call_kwargs` go to the pipeline call (negative_prompt, height, width, ...).
    """
    progress_config = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    try:
        with Trace(denoiser(pipe), retain_input=True, stop=True, detach=False) as trace:
            pipe(prompt=list(prompts), num_inference_steps=1, guidance_scale=guidance_scale, output_type="latent",
                 generator=torch.Generator("cpu").manual_seed(0), **call_kwargs)
    finally:
        pipe._progress_bar_config = progress_config
    if "" not in trace.input:
        raise MemPruneError("The pipeline finished without calling its denoiser: cannot capture its conditioning.")
    args, kwargs = trace.input[""]
    return args, {k: v for k, v in kwargs.items() if k not in INPUT_KEYWORDS}


def _call_kwargs(pipe, size: tuple[int, int] | None) -> dict:
    from .generate import GenerationSettings, pipeline_call_kwargs

    height, width = size if size is not None else (None, None)
    return pipeline_call_kwargs(pipe, GenerationSettings(height=height, width=width))


def encode_conditioning(pipe, prompts: list[str], batch_size: int = 16,
                        size: tuple[int, int] | None = None) -> Conditioning:
    """The pipeline's own conditioning of `prompts` without guidance (captured at its first denoiser call), at
    `size` (height, width; default the pipeline's: SDXL's size conditioning depends on it)."""
    parts = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start:start + batch_size])
            _, kwargs = capture_conditioning(pipe, batch, 1.0, **_call_kwargs(pipe, size))
            if STATES not in kwargs:
                raise MemPruneError("The pipeline's denoiser call has no encoder_hidden_states: cannot fine-tune it.")
            parts.append({k: v for k, v in kwargs.items() if v is not None})
    return Conditioning(concatenated(parts), None, list(prompts))


def require_cfg_pipeline(pipe, what: str) -> None:
    """Refuse, in one sentence, a pipeline without an unconditional branch or without a denoiser taking text."""
    from .generate import guidance_distilled

    if guidance_distilled(pipe):
        raise MemPruneError(f"{what} needs classifier-free guidance, and {type(pipe).__name__} is "
                            "guidance-distilled: its "
                            "guidance scale is an input of the transformer and it has no unconditional prediction.")
    if not hasattr(pipe, "encode_prompt") or getattr(pipe, "vae", None) is None:
        raise MemPruneError(f"{what} needs a text-to-image pipeline with encode_prompt and a VAE (SD 1.x/2.x, SDXL, "
                            "PixArt, SD3).")
    denoiser(pipe)  # refuses a pipeline without one


def encode(pipe, prompts: list[str], negative_prompt=None, size: tuple[int, int] | None = None) -> Conditioning:
    """Encode prompts (one embedding per prompt) and the negative prompt exactly as the pipeline's own call would
    (with classifier-free guidance, at `size`, default the pipeline's)."""
    require_cfg_pipeline(pipe, "Encoding a prompt and its negative prompt")
    with torch.no_grad():
        negative = {} if negative_prompt is None else {"negative_prompt": negative_prompt}  # PixArt's default is ""
        _, kwargs = capture_conditioning(pipe, prompts, 2.0, **negative,
                                         **_call_kwargs(pipe, size or default_size(pipe)))
    n = 2 * len(prompts)
    if kwargs.get(STATES) is None or kwargs[STATES].shape[0] != n:
        raise MemPruneError("The pipeline's denoiser call holds no [negative, prompt] batch of encoder_hidden_states: "
                            "its conditioning cannot be optimised.")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    halves = [rows_of(kwargs, torch.arange(start, start + len(prompts)), n) for start in (0, len(prompts))]
    return Conditioning(halves[1], halves[0], list(prompts))


def asked_size(pipe, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """(height, width) in pixels: the asked sides, the pipeline's default for a side not asked."""
    default_height, default_width = default_size(pipe)
    return (height or default_height, width or default_width)


def default_size(pipe) -> tuple[int, int]:
    """The pipeline's default (height, width) in pixels: the denoiser's sample size times the VAE scale factor."""
    size = getattr(denoiser(pipe).config, "sample_size", None) or pipe.default_sample_size
    size = size * pipe.vae_scale_factor
    return (size, size) if isinstance(size, int) else tuple(size)


def predict_noise(pipe, latents: torch.Tensor, timestep, kwargs: dict) -> torch.Tensor:
    """The denoiser's prediction at (latents, t) with these keyword arguments (scaled model input expected); a
    learned-variance output (PixArt: twice the latent channels) gives its first half, as the pipeline takes it."""
    net = denoiser(pipe)
    if torch.is_tensor(timestep) and timestep.dim() == 0:
        timestep = timestep.expand(len(latents))
    output = net.forward(latents, timestep=timestep, **kwargs, return_dict=False)[0]  # DiTs take t as a keyword
    if output.shape[1] == 2 * latents.shape[1]:
        output = output.chunk(2, dim=1)[0]
    return output


def scaled_input(scheduler, latents: torch.Tensor, t) -> torch.Tensor:
    """The scheduler's scaling of the denoiser input (flow-matching schedulers have none)."""
    scale = getattr(scheduler, "scale_model_input", None)
    return latents if scale is None else scale(latents, t)


def text_noise_norm(eps: torch.Tensor) -> torch.Tensor:
    """‖ε(x, c) − ε(x, ∅)‖₂ per sample (norm over C, H, W) of a classifier-free-guidance prediction batched as
    [unconditional, conditional]: Wen et al.'s detection score and the quantity their mitigation lowers."""
    uncond, cond = eps.float().chunk(2)
    return (cond - uncond).flatten(1).norm(dim=1)


def pipeline_kwargs(conditioning: Conditioning, cond: torch.Tensor | None = None) -> dict:
    """The keyword arguments that make the pipeline use these embeddings (optionally replacing the prompt's)."""
    kwargs: dict[str, Any] = {}
    for path, names in PIPELINE_KEYWORDS.items():
        for source, name in ((conditioning.kwargs, names[0]), (conditioning.uncond_kwargs, names[1])):
            value: Any = source
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            if value is not None:
                kwargs[name] = value
    if cond is not None:
        kwargs["prompt_embeds"] = cond
    if "negative_prompt_embeds" in kwargs:
        kwargs["negative_prompt"] = None  # PixArt's default "" would clash with the embeddings
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

