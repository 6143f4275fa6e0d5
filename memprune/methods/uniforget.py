"""UniForget (Jin et al. 2025, arXiv 2512.09687): prune memorization without knowing what is memorized.

One learnable hard-concrete (L0) gate (Louizos et al. 2018) sits on every FeedForward hidden neuron, i.e. on
each of the H inputs of the FeedForward's output Linear (the same neurons memprune records and Wanda masks).
The gates are trained on *neutral* (non-memorized) prompts only: the gated model starts from the same noise as
the frozen original and must end a short sampling trajectory at the same latent, while a penalty pushes gates
closed. Neurons whose gate closes are not needed for ordinary generation; the paper's finding is that they carry
the memorized content, so pruning them suppresses memorization without ever looking at a memorized prompt.
Closed gates become a neuron-granularity `Masks` (whole columns of the output Linear's weight) that
`memprune.prune.apply_masks` applies exactly like a Wanda mask.

The formulas (γ = -0.1, ζ = 1.1, temperature β_t = 2/3, one `log_alpha` per neuron):

- training (stochastic): u ~ U(0, 1), s = sigmoid((log u - log(1 - u) + log_alpha) / β_t),
  z = clamp(s·(ζ - γ) + γ, 0, 1)
- end (deterministic): z = clamp(sigmoid(log_alpha)·(ζ - γ) + γ, 0, 1)
- expected L0 (probability that a gate is non-zero): sigmoid(log_alpha - β_t·log(-γ / ζ))
- loss = MSE(final latent of the gated model, final latent of the original) + β · mean expected L0

Choices made where the paper (or its summary we work from) is silent — all are settings in `UniForgetSettings`:

- **Initialisation.** log_alpha = 3 for every gate. The deterministic gate is then exactly 1
  (sigmoid(3)·1.2 - 0.1 = 1.043, clamped to 1), so the *deterministic* gated model equals the original
  bit for bit at init. The stochastic gate is not always 1 at init: it is exactly 1 only when
  u > sigmoid(β_t·logit(11/12) - 3) ≈ 0.198, so about 80 % of the sampled gates are fully open at step 0 and
  the rest are slightly below 1. The equality claim and its test are about the deterministic mode.
- **Closed gate.** A neuron is pruned when its deterministic gate is exactly 0, i.e. log_alpha <= -log(11)
  ≈ -2.398 (`close_threshold = 0.0`; a larger threshold t prunes neurons with deterministic z <= t). Gates that
  end partly open (0 < z < 1) are kept at full strength: the pruned model only removes neurons, it does not
  rescale the others, so it can differ from the gated model used in training.
- **One gate sample per training step.** u is drawn once per gate per optimisation step and shared by all
  prompts of the batch and all denoiser calls of the trajectory (the pruned model is one fixed set of gates).
- **Trajectory.** A deterministic DDIM sampler (eta = 0) built from the pipeline's scheduler config
  (`DDIMScheduler.from_config`, so prediction type and beta schedule are the pipeline's), `sampling_steps = 10`,
  with the pipeline's classifier-free guidance (its default scale unless `guidance_scale` is set; no guidance
  rescale). Conditioning (prompt embeddings, SDXL's pooled embeddings and time ids) is taken from the pipeline
  itself: we call it and capture the keyword arguments of its first denoiser call, so SD 1.x/2.x/SDXL need no
  per-architecture code. Both trajectories start from the same seeded Gaussian latent; fresh noise every step.
- **Back-propagation.** Through the whole gated trajectory by default (`backprop_steps = None`): memorization
  is decided in the first, noisiest steps (Chavhan prunes the masks of steps 0..9), so truncating to the last
  steps would not train the gates on what matters. `backprop_steps = k` runs the first steps without a graph and
  back-propagates through the last k only (cheaper, documented trade-off). `checkpoint = True` recomputes each
  denoiser call in the backward pass (torch.utils.checkpoint), so memory stays at one call instead of N.
- **The L0 term** is the mean expected L0 over *all* gates of all layers pooled (the expected share of open
  gates), so β trades latent MSE against the share of the network kept. MSE is the mean over latent elements,
  computed in float32.
- **Optimiser.** Adam on the log_alphas only, lr = 0.5 (the paper's), fixed number of steps (`train_steps`).
  Adam normalises the gradient, so each log_alpha moves by about lr per step whatever β is: from 3 a gate needs
  about 11 consistent steps to close. β matters through the sign of each gate's total gradient (MSE vs L0),
  not its size. Every other parameter of the pipeline has requires_grad False while training (restored after),
  so model weights stay bit-identical. On the embedded testbed (batch 4, 10 DDIM steps, 1 CPU thread,
  ~1.7-2.8 s per step) lr 0.5 for 60 steps prunes 79 / 85 / 91 % of the FeedForward neurons for β = 1 / 2 / 5
  (no gate can close before step 11); lr 0.1 for 100 steps prunes 67 % at β = 1. Pruned share is set mostly
  by lr × train_steps; sweep those as well as β.
- **Neutral prompts only.** `train_gates` refuses to train when a neutral prompt is one of the given
  memorized prompts (compared after collapsing whitespace and case-folding); `memprune prune --method uniforget`
  uses the testbed's memorized.csv automatically when the model is the embedded testbed.
- **Masks.** The closed-gate mask is step-independent; it is stored for steps 0..`steps`-1 (default 50, as
  `memprune locate`) so `apply_masks(..., timesteps=τ)` and `union_masks` with a Wanda mask work unchanged.
  Every step holds its own copy of the indices (safetensors refuses shared tensors), so for SDXL-size models
  with a large pruned share prefer `steps = τ`.
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

METHOD = MethodInfo(
    name="uniforget", kind="weight_edit",
    summary="Hard-concrete gates per FeedForward neuron trained on neutral prompts only; closed gates are pruned.",
    reference="Jin et al. 2025, UniForget, arXiv 2512.09687",
    stage="prune",
)


# --------------------------------------------------------------------------------------------------------------
# Settings and results
# --------------------------------------------------------------------------------------------------------------


@dataclass
class UniForgetSettings:
    beta: float = 1.0  # weight of the mean expected L0 (the paper sweeps 1, 2, 5)
    lr: float = 0.5  # Adam learning rate on log_alpha (the paper's)
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
    close_threshold: float = 0.0  # pruned iff deterministic gate <= this
    steps: int = 50  # mask steps 0..steps-1 (the mask is the same at every step)
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
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
    gates: NeuronGates
    history: pd.DataFrame  # step, loss, mse, expected_l0, closed_share
    pruned: pd.DataFrame  # layer, hidden, pruned, share
    masks: Masks
    settings: UniForgetSettings
    seconds: float = 0.0
    prompts: list[str] = field(default_factory=list)

    @property
    def pruned_share(self) -> float:
        """Share of all FeedForward hidden neurons pruned."""
        return float(self.pruned["pruned"].sum() / self.pruned["hidden"].sum())


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
    """Train one hard-concrete gate per FeedForward neuron on neutral prompts; return gates, history and masks.

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

    gates = NeuronGates.for_denoiser(net, init_log_alpha=settings.init_log_alpha, temperature=settings.temperature,
                                     gamma=settings.gamma, zeta=settings.zeta)
    optimizer = torch.optim.Adam(gates.parameters(), lr=settings.lr)
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    order = np.random.default_rng(settings.seed)
    queue: list[int] = []
    history = []
    start = time.perf_counter()
    bar = tqdm(range(settings.train_steps), desc=f"UniForget gates (beta={settings.beta:g})",
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
                    l0 = gates.expected_l0()
                    loss = mse + settings.beta * l0
                    if not torch.isfinite(loss):
                        raise MemPruneError(f"UniForget loss became {loss.item()} at step {step}: "
                                            "lower --lr or check the model.")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                optimizer.step()
                closed = gates.closed(settings.close_threshold)
                closed_share = float(sum(c.sum() for c in closed.values()) / sum(c.numel() for c in closed.values()))
                history.append({"step": step, "loss": loss.item(), "mse": mse.item(), "expected_l0": l0.item(),
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
    masks = uniforget_masks(gates, layer_shapes(net), settings.steps, settings.close_threshold, masks_meta)
    columns = ["step", "loss", "mse", "expected_l0", "closed_share"]
    return GateResult(gates=gates, history=pd.DataFrame(history, columns=columns),
                      pruned=gates.pruned_share(settings.close_threshold), masks=masks, settings=settings,
                      seconds=seconds, prompts=neutral_prompts)


def _settings_dict(settings: UniForgetSettings) -> dict:
    values = asdict(settings)
    values.pop("progress", None)
    return values


def save_gate_result(result: GateResult, folder: str | Path) -> None:
    """masks.safetensors + masks.json (for `memprune prune --masks`), gates.safetensors, loss.csv, pruned_share.csv."""
    from safetensors.torch import save_file

    folder = Path(folder)
    result.masks.save(folder)
    save_file({name: value.contiguous() for name, value in result.gates.state_dict().items()},
              str(folder / "gates.safetensors"))
    result.history.to_csv(folder / "loss.csv", index=False)
    result.pruned.to_csv(folder / "pruned_share.csv", index=False)
    write_prompts(result.prompts, folder / "prompts_used.csv")


def settings_from_options(options: dict) -> UniForgetSettings:
    """UniForgetSettings from `memprune prune`'s options (--timesteps sets the steps the mask is stored at)."""
    return UniForgetSettings(beta=options.get("beta", 1.0), train_steps=options.get("train_steps", 100),
                             lr=options.get("lr", 0.5), sampling_steps=options.get("sampling_steps", 10),
                             steps=max(options.get("timesteps", 50), 1))


def edit(pipe, settings: UniForgetSettings, neutral_prompts: list[str], memorized_prompts: list[str] | None = None,
         meta: dict | None = None) -> Masks:
    """The weight-edit entry point: train the gates on `neutral_prompts` and return the closed-gate masks."""
    return train_gates(pipe, neutral_prompts, settings, memorized_prompts, meta=meta).masks
