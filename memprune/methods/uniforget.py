"""UniForget (Jin et al. 2025, arXiv 2512.09687): prune memorization without knowing what is memorized.

Learnable masks sit on the denoiser's units; they are trained on *neutral* (non-memorized) prompts only: the
masked model starts from the same noise as the frozen original and must end a short sampling trajectory at the
same final denoised latent (MSE), while a sparsity penalty weighted by β pushes the masks closed. Units whose mask
closes are not needed for ordinary generation; the paper's finding is that they carry the memorized content, so
pruning them suppresses memorization without ever looking at a memorized prompt.

**What follows the paper** (default, `gates="sigmoid"`):

- **Layers.** Masks on the FeedForward (FFN) layers *and* the normalisation layers (`layers=("ffn", "norm")`):
  the paper's ablation finds FFN-only masks weaker than FFN + normalisation. An FFN mask scales each hidden
  neuron (the input of the FeedForward's output Linear, the neurons memprune records and Wanda masks); a norm mask
  scales each output channel of every GroupNorm / LayerNorm with affine parameters, found by type
  (memprune.methods.uniforget_relax).
- **Relaxation.** mask = σ(0.4·M + 1) for a free logit M per unit.
- **Loss.** MSE(final latent of the masked model, final latent of the original) + β · penalty; β in the paper's
  sweep {1, 2, 5}.

**Where the port differs or chooses** (the paper's text was not available to check these; all are settings):

- **Attention masks** (the paper also mentions attention) are not implemented: its ablation is stated as FFN vs
  FFN + normalisation, and an attention-head mask would need a third kind of weight edit.
- **Penalty.** The mean relaxed mask value over all units pooled (an L1 norm of the positive mask divided by its
  size, so β trades latent MSE against the share of the network kept).
- **Initialisation.** M = 0 (`init_logit`), so every mask starts at σ(1) ≈ 0.731 and the masked model at step 0
  is *not* the original: the MSE term first pulls the masks open. Each unit's M moves about lr per Adam step, so
  at lr 0.5 an undefended unit can close (M = -2.5) after about 5 steps: the pruned share is set mostly by
  lr × train_steps and β, as with the gates.
- **Binarisation.** After training a unit is pruned when its relaxed mask is <= 0.5 (M <= -2.5,
  `close_threshold`); the others are kept at full strength (1, not their trained value), so the pruned model only
  removes units and can differ from the masked model used in training.
- **Weight edit.** A pruned FFN neuron is a zeroed column of the output Linear (a `Masks` file, applied by
  `memprune.prune.apply_masks` like Wanda's). A pruned norm channel is its affine weight and bias set to zero
  (exactly the channel's output times 0); they are saved beside the masks (norm_channels.safetensors),
  `memprune prune` zeroes them and records them in memprune.json (`norm_channels_zeroed`).

**Hard-concrete gates** (`gates="hard-concrete"`, the earlier port): one L0 gate (Louizos et al. 2018) per FFN
neuron only, γ = -0.1, ζ = 1.1, β_t = 2/3: training s = σ((log u - log(1-u) + log_alpha)/β_t),
z = clamp(s(ζ-γ)+γ, 0, 1); end z = clamp(σ(log_alpha)(ζ-γ)+γ, 0, 1); penalty = mean expected L0
σ(log_alpha - β_t·log(-γ/ζ)). log_alpha starts at 3 (the deterministic gate is exactly 1, so the gated model
equals the original at init); a neuron is pruned when its deterministic gate is exactly 0 (`close_threshold`
0.0). One gate sample per optimisation step, shared by the batch and the trajectory. This is the paper's weaker
(FFN-only) layer set with another relaxation.

Shared by both (settings of `UniForgetSettings`):

- **Trajectory.** A deterministic DDIM sampler (eta = 0) built from the pipeline's scheduler config (prediction
  type and beta schedule are the pipeline's), `sampling_steps = 10`, with the pipeline's classifier-free guidance.
  Conditioning is captured from the pipeline's own first denoiser call, so SD 1.x/2.x/SDXL need no
  per-architecture code. Both trajectories start from the same seeded Gaussian latent.
- **Back-propagation.** Through the whole masked trajectory by default (memorization is decided in the first,
  noisiest steps); `backprop_steps = k` back-propagates through the last k calls only; `checkpoint = True`
  recomputes each denoiser call in backward (memory of one call).
- **Optimiser.** Adam on the mask logits only, lr = 0.5, `train_steps` steps. Every pipeline weight has
  requires_grad False while training (restored after) and stays bit-identical. Measured on the embedded testbed
  with hard-concrete gates (batch 4, 10 DDIM steps, 1 CPU thread): lr 0.5 for 60 steps prunes 79 / 85 / 91 % of
  the FeedForward neurons for β = 1 / 2 / 5; the pruned share is set mostly by lr × train_steps.
- **Neutral prompts only.** `train_gates` refuses a neutral prompt that is one of the given memorized prompts
  (after collapsing whitespace and case-folding).
- **Masks.** The FFN mask is step-independent; it is stored for steps 0..`steps`-1 (default 50) so
  `apply_masks(..., timesteps=τ)` and `union_masks` with a Wanda mask work unchanged.
- **Determinism.** One CPU generator seeded with `seed` draws the prompt order, the noise and the gate samples.
"""
from __future__ import annotations

import copy
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from tqdm.auto import tqdm

from ..conditioning import capture_conditioning, frozen
from ..errors import MemPruneError
from ..masks import Masks
from ..models import denoiser, layer_shapes, pipeline_modules
from ..prompts import overlapping_captions, write_prompts
from .base import MethodInfo
from .uniforget_gates import GAMMA, TEMPERATURE, ZETA, NeuronGates, uniforget_masks
from .uniforget_relax import LAYER_KINDS, RelaxedMasks, save_norm_channels

METHOD = MethodInfo(
    name="uniforget", kind="weight_edit",
    summary="Masks σ(0.4·M+1) on FeedForward neurons and normalisation channels trained on neutral prompts only; "
            "closed masks are pruned.",
    reference="Jin et al. 2025, UniForget, arXiv 2512.09687",
    stage="prune",
)


# --------------------------------------------------------------------------------------------------------------
# Settings and results
# --------------------------------------------------------------------------------------------------------------


GATE_KINDS = ("sigmoid", "hard-concrete")
CLOSE_THRESHOLDS = {"sigmoid": 0.5, "hard-concrete": 0.0}


@dataclass
class UniForgetSettings:
    beta: float = 1.0  # weight of the sparsity penalty (the paper sweeps 1, 2, 5)
    lr: float = 0.5  # Adam learning rate on the mask logits / log_alpha
    gates: str = "sigmoid"  # "sigmoid": the paper's σ(0.4·M+1) masks; "hard-concrete": L0 gates on FFN neurons
    layers: tuple[str, ...] | None = None  # "ffn" and/or "norm" (None: both for sigmoid; hard-concrete: "ffn" only)
    init_logit: float = 0.0  # sigmoid masks: M at init (mask σ(1) ≈ 0.731)
    train_steps: int = 100  # optimisation steps
    batch_size: int = 1  # neutral prompts per optimisation step
    sampling_steps: int = 10  # DDIM steps of the trajectory whose final latent is matched
    guidance_scale: float | None = None  # None: the pipeline's default
    backprop_steps: int | None = None  # None: through the whole trajectory; k: through the last k denoiser calls
    checkpoint: bool = False  # recompute denoiser calls in backward (memory of one call, ~1.3x time)
    init_log_alpha: float = 3.0  # deterministic gates exactly 1 at init
    temperature: float = TEMPERATURE
    gamma: float = GAMMA
    zeta: float = ZETA
    close_threshold: float | None = None  # pruned iff mask <= this (None: 0.5 sigmoid, 0.0 hard-concrete)
    steps: int = 50  # mask steps 0..steps-1 (the mask is the same at every step)
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.gates not in GATE_KINDS:
            raise MemPruneError(f"UniForget gates must be one of {', '.join(GATE_KINDS)}, got '{self.gates}'.")
        if self.layers is None:
            self.layers = LAYER_KINDS if self.gates == "sigmoid" else ("ffn",)
        self.layers = tuple(self.layers)
        if not self.layers or any(kind not in LAYER_KINDS for kind in self.layers):
            raise MemPruneError(f"UniForget layers must be among {', '.join(LAYER_KINDS)}, got {list(self.layers)}.")
        if self.gates == "hard-concrete" and self.layers != ("ffn",):
            raise MemPruneError("UniForget's hard-concrete gates sit on FeedForward neurons only: use --mask-layers "
                                "ffn, or --gates sigmoid for normalisation masks.")
        if self.close_threshold is None:
            self.close_threshold = CLOSE_THRESHOLDS[self.gates]
        if self.beta < 0:
            raise MemPruneError(f"UniForget beta must be >= 0, got {self.beta}.")
        if self.lr <= 0:
            raise MemPruneError(f"UniForget lr must be > 0, got {self.lr}.")
        for name in ("train_steps", "batch_size", "sampling_steps", "steps"):
            if getattr(self, name) < 1:
                raise MemPruneError(f"UniForget {name} must be at least 1, got {getattr(self, name)}.")
        if self.backprop_steps is not None and not 1 <= self.backprop_steps <= self.sampling_steps:
            raise MemPruneError(
                f"UniForget backprop_steps must be between 1 and sampling_steps ({self.sampling_steps}), "
                f"got {self.backprop_steps}."
            )
        if not 0 <= self.close_threshold < 1:
            raise MemPruneError(f"UniForget close_threshold must be in [0, 1), got {self.close_threshold}.")


@dataclass
class GateResult:
    gates: NeuronGates | RelaxedMasks
    history: pd.DataFrame  # step, loss, mse, expected_l0 (hard-concrete) or mask_mean (sigmoid), closed_share
    pruned: pd.DataFrame  # layer, (kind,) hidden, pruned, share
    masks: Masks
    settings: UniForgetSettings
    seconds: float = 0.0
    prompts: list[str] = field(default_factory=list)
    norm_channels: dict[str, torch.Tensor] = field(default_factory=dict)  # pruned channels per norm layer

    @property
    def pruned_share(self) -> float:
        """Share of all masked units (FeedForward neurons, and norm channels with sigmoid masks) pruned."""
        return float(self.pruned["pruned"].sum() / self.pruned["hidden"].sum())


def make_gates(net: nn.Module, settings: UniForgetSettings) -> NeuronGates | RelaxedMasks:
    """The trainable masks of `settings.gates` for a denoiser."""
    if settings.gates == "hard-concrete":
        return NeuronGates.for_denoiser(net, init_log_alpha=settings.init_log_alpha,
                                        temperature=settings.temperature, gamma=settings.gamma, zeta=settings.zeta)
    return RelaxedMasks.for_denoiser(net, settings.layers or LAYER_KINDS, settings.init_logit)


def _penalty(gates: NeuronGates | RelaxedMasks) -> torch.Tensor:
    return gates.penalty() if isinstance(gates, RelaxedMasks) else gates.expected_l0()


def _penalty_name(gates: NeuronGates | RelaxedMasks) -> str:
    return gates.penalty_name if isinstance(gates, RelaxedMasks) else "expected_l0"


# --------------------------------------------------------------------------------------------------------------
# Neutral prompts
# --------------------------------------------------------------------------------------------------------------


def check_neutral(neutral_prompts: list[str], memorized_prompts: list[str] | None) -> None:
    """Refuse a training set that holds a memorized prompt (UniForget must never see one)."""
    if not neutral_prompts:
        raise MemPruneError("UniForget needs at least one neutral (non-memorized) prompt to train on.")
    if memorized_prompts is None:
        return
    overlap = overlapping_captions(neutral_prompts, memorized_prompts)
    if overlap:
        index = overlap[0]
        raise MemPruneError(
            f"Neutral prompt {index + 1} ('{neutral_prompts[index]}') is one of the memorized prompts: UniForget "
            "trains on non-memorized captions only, remove it from the neutral prompts."
        )


# --------------------------------------------------------------------------------------------------------------
# The trajectory
# --------------------------------------------------------------------------------------------------------------


def sample_trajectory(net: nn.Module, scheduler, latents: torch.Tensor, conditioning: dict, guidance_scale: float,
                      cfg: bool, grad_from: int | None = None, checkpoint: bool = False) -> torch.Tensor:
    """Run DDIM from `latents` over `scheduler.timesteps`; build a graph from denoiser call `grad_from` on."""
    for index, t in enumerate(scheduler.timesteps):
        with torch.set_grad_enabled(grad_from is not None and index >= grad_from):
            model_input = torch.cat([latents, latents]) if cfg else latents
            model_input = scheduler.scale_model_input(model_input, t)

            def call(x, t=t):
                return net(x, t, **conditioning, return_dict=False)[0]

            if checkpoint and torch.is_grad_enabled():
                noise = torch.utils.checkpoint.checkpoint(call, model_input, use_reentrant=False)
            else:
                noise = call(model_input)
            if cfg:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance_scale * (cond - uncond)
            latents = scheduler.step(noise, t, latents, eta=0.0, return_dict=False)[0]
    return latents


# --------------------------------------------------------------------------------------------------------------
# Training and masks
# --------------------------------------------------------------------------------------------------------------


def union_masks(a: Masks, b: Masks) -> Masks:
    """Per (layer, step), the weights selected by either mask (e.g. UniForget ∪ Wanda).

    Both must cover the same layers with the same weight shapes and the same steps.
    """
    if a.shapes.keys() != b.shapes.keys():
        only = sorted(set(a.shapes) ^ set(b.shapes))
        raise MemPruneError(f"Cannot unite masks of different models: layer '{only[0]}' is in only one of them.")
    for layer, shape in a.shapes.items():
        if tuple(shape) != tuple(b.shapes[layer]):
            raise MemPruneError(
                f"Cannot unite masks of different models: layer '{layer}' has weight shape {list(shape)} in one "
                f"and {list(b.shapes[layer])} in the other."
            )
    if set(a.indices) != set(b.indices):
        raise MemPruneError(
            f"Cannot unite masks with different steps ({len(a.steps)} vs {len(b.steps)}): make the UniForget mask "
            f"with steps={len(b.steps) if a.meta.get('method') == METHOD.name else len(a.steps)}."
        )
    indices = {key: torch.unique(torch.cat([idx, b.indices[key]])) for key, idx in a.indices.items()}
    meta: dict[str, Any] = {"method": "union", "parts": [a.meta, b.meta]}
    for key in ("model",):
        if key in a.meta or key in b.meta:
            meta[key] = a.meta.get(key, b.meta.get(key))
    meta["selection"] = {"method": "union", "parts": [a.meta.get("selection", a.meta.get("method")),
                                                      b.meta.get("selection", b.meta.get("method"))]}
    return Masks(indices=indices, shapes=dict(a.shapes), meta=meta)


def train_gates(pipe, neutral_prompts: list[str], settings: UniForgetSettings | None = None,
                memorized_prompts: list[str] | None = None, meta: dict | None = None) -> GateResult:
    """Train the masks of `settings.gates` on neutral prompts; return them, the history and the pruned masks.

    Only the gates train; every pipeline weight stays bit-identical. `memorized_prompts`, when given, must not
    overlap `neutral_prompts` (MemPruneError otherwise).
    """
    from diffusers import DDIMScheduler

    from ..generate import GenerationSettings
    from ..generate import guidance_scale as resolve_guidance

    settings = settings or UniForgetSettings()
    neutral_prompts = list(neutral_prompts)
    check_neutral(neutral_prompts, memorized_prompts)
    if memorized_prompts is None:
        warnings.warn("UniForget got no memorized prompts to exclude: the neutral prompts were not checked.",
                      stacklevel=2)
    net = denoiser(pipe)
    device = next(net.parameters()).device
    guidance = resolve_guidance(pipe, GenerationSettings(guidance_scale=settings.guidance_scale))
    cfg = guidance > 1.0
    scheduler = DDIMScheduler.from_config(copy.deepcopy(dict(pipe.scheduler.config)))
    scheduler.set_timesteps(settings.sampling_steps, device=device)
    grad_from = 0 if settings.backprop_steps is None else settings.sampling_steps - settings.backprop_steps

    gates = make_gates(net, settings)
    threshold = float(settings.close_threshold or 0.0)
    penalty_name = _penalty_name(gates)
    optimizer = torch.optim.Adam(gates.parameters(), lr=settings.lr)
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    order = np.random.default_rng(settings.seed)
    queue: list[int] = []
    history = []
    start = time.perf_counter()
    bar = tqdm(range(settings.train_steps), desc=f"UniForget {settings.gates} masks (beta={settings.beta:g})",
               disable=not settings.progress, leave=False)
    try:
        with frozen(*pipeline_modules(pipe), net):
            for step in bar:
                while len(queue) < settings.batch_size:
                    queue.extend(order.permutation(len(neutral_prompts)).tolist())
                batch, queue = [neutral_prompts[i] for i in queue[: settings.batch_size]], queue[settings.batch_size:]
                with torch.no_grad():
                    args, conditioning = capture_conditioning(pipe, batch, guidance)
                sample = args[0] if args else None
                if sample is None:
                    raise MemPruneError("Could not read the latent shape from the pipeline's denoiser call.")
                shape = (len(batch), *sample.shape[1:])
                noise = torch.randn(shape, generator=generator).to(device, sample.dtype) * scheduler.init_noise_sigma
                with torch.no_grad():
                    target = sample_trajectory(net, scheduler, noise, conditioning, guidance, cfg)
                gates.resample(generator)
                with gates.apply(net):  # backward inside: checkpointing re-runs the gated denoiser calls
                    gated = sample_trajectory(net, scheduler, noise, conditioning, guidance, cfg, grad_from=grad_from,
                                              checkpoint=settings.checkpoint)
                    mse = F.mse_loss(gated.float(), target.float())
                    l0 = _penalty(gates)
                    loss = mse + settings.beta * l0
                    if not torch.isfinite(loss):
                        raise MemPruneError(f"UniForget loss became {loss.item()} at step {step}: "
                                            "lower --lr or check the model.")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                optimizer.step()
                closed = gates.closed(threshold)
                closed_share = float(sum(c.sum() for c in closed.values()) / sum(c.numel() for c in closed.values()))
                history.append({"step": step, "loss": loss.item(), "mse": mse.item(), penalty_name: l0.item(),
                                "closed_share": closed_share})
                bar.set_postfix(mse=f"{mse.item():.4f}", l0=f"{l0.item():.3f}", closed=f"{closed_share:.3f}")
    finally:
        bar.close()
        gates.deterministic()
    seconds = time.perf_counter() - start
    for log_alpha in gates.parameters():
        log_alpha.grad = None
    masks_meta = {
        **(meta or {}),
        "method": METHOD.name,
        "selection": {"method": METHOD.name, "granularity": "neuron", **_settings_dict(settings)},
        "beta": settings.beta,
        "steps": settings.steps,
        "lr": settings.lr,
        "prompts": len(neutral_prompts),
        "memorized_checked": None if memorized_prompts is None else len(memorized_prompts),
        "guidance_scale": guidance,
        "train_seconds": round(seconds, 3),
    }
    norm_channels = gates.closed_norm_channels(threshold) if isinstance(gates, RelaxedMasks) else {}
    if isinstance(gates, RelaxedMasks):
        masks_meta["norm_channels_pruned"] = {name: int(idx.numel()) for name, idx in norm_channels.items()}
    masks = uniforget_masks(gates, layer_shapes(net), settings.steps, threshold, masks_meta)
    columns = ["step", "loss", "mse", penalty_name, "closed_share"]
    return GateResult(gates=gates, history=pd.DataFrame(history, columns=columns),
                      pruned=gates.pruned_share(threshold), masks=masks, settings=settings,
                      seconds=seconds, prompts=neutral_prompts, norm_channels=norm_channels)


def _settings_dict(settings: UniForgetSettings) -> dict:
    values = asdict(settings)
    values.pop("progress", None)
    return values


def save_gate_result(result: GateResult, folder: str | Path) -> None:
    """masks.safetensors + masks.json (for `memprune prune --masks`), norm_channels.safetensors (sigmoid masks),
    gates.safetensors (the trained logits), loss.csv, pruned_share.csv."""
    from safetensors.torch import save_file

    folder = Path(folder)
    result.masks.save(folder)
    if result.settings.gates == "sigmoid":
        save_norm_channels(result.norm_channels, folder)
    save_file({name: value.contiguous() for name, value in result.gates.state_dict().items()},
              str(folder / "gates.safetensors"))
    result.history.to_csv(folder / "loss.csv", index=False)
    result.pruned.to_csv(folder / "pruned_share.csv", index=False)
    write_prompts(result.prompts, folder / "prompts_used.csv")


def settings_from_options(options: dict) -> UniForgetSettings:
    """UniForgetSettings from `memprune prune`'s options (--timesteps sets the steps the mask is stored at)."""
    layers = options.get("mask_layers")
    return UniForgetSettings(beta=options.get("beta", 1.0), train_steps=options.get("train_steps", 100),
                             lr=options.get("lr", 0.5), sampling_steps=options.get("sampling_steps", 10),
                             steps=max(options.get("timesteps", 50), 1), gates=options.get("gates") or "sigmoid",
                             layers=tuple(layers.split("+")) if layers else None)


def edit(pipe, settings: UniForgetSettings, neutral_prompts: list[str], memorized_prompts: list[str] | None = None,
         meta: dict | None = None) -> Masks:
    """The weight-edit entry point: train the gates on `neutral_prompts` and return the closed-gate masks."""
    return train_gates(pipe, neutral_prompts, settings, memorized_prompts, meta=meta).masks
