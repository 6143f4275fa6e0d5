"""DoCo ("Unlearning Concepts in Diffusion Model via Concept Domain Correction and Concept Preserving Gradient",
Wu et al., arXiv 2405.15304), for memorized captions, on the shared loop of `memprune.finetune`.

A student denoiser (all of its cross-attention by default: to_q, to_k, to_v and to_out of every attention that
reads the text, found by type; `--params`) is trained while the frozen teacher (the unedited model) supplies the
anchor domain. Each step has three parts:

1. **Concept-domain correction (adversarial).** A small discriminator D sees predicted clean latents x̂0. Real
   (label 0): the teacher's x̂0 for *anchor* prompts. Fake (label 1): the student's x̂0 for *memorized* prompts,
   both at the same noisy latent x_t. D is trained with BCE. After a warm-up the student gets the generator
   loss BCE(D(x̂0_student(memorized)), 0): its outputs for memorized captions must look like the anchors' output
   domain.
2. **Retention (prior preservation).** The ordinary diffusion loss on the anchor images: ‖ε_θ(x_t, c_anchor) − ε‖²
   to the ground-truth noise ε that made x_t (the scheduler's target — v, or x0 — on v-/sample-prediction models),
   as the public re-implementation's `with_prior_preservation` does (`retention="noise"`, the shared loop's
   `retain_target="data"`). The anchor images are the shared loop's retain latents: the unedited model's
   generations for the retain captions (or `--retain-images`), which are the default anchors. `retention="distill"`
   (`--retention distill`, the earlier port) instead matches the frozen teacher's prediction for the same input
   (`retain_target="teacher"`); it starts at zero loss and never pulls towards the data.
3. **Concept-preserving gradient (surgery).** With g_u the unlearning (generator-loss) gradient and g_r the
   retain gradient: if cos(g_u, g_r) < 0, g_u ← g_u - (g_u·g_r / ‖g_r‖²) g_r (`surgery`, a pure function).
   The step uses g_r + unlearn_weight · g_u.

Choices the paper (and the public re-implementation we read, CUIG's train_doco.py) leave open or that differ
here, all fields of `DoCoSettings` unless stated:

- **Parameters.** `--params xattn` by default (`DEFAULT_PARAMS`): all Linears of the cross-attentions. The
  re-implementation's group named "cross-attn" trains attn2's to_k/to_v only (`--params kv`, the earlier port's
  default) and its notes train the full weights for memorization (`--params unet`); all of cross-attention is
  the middle ground this issue's comparison asks for.
- **Anchors.** DoCo maps a concept onto a broader anchor concept ("Van Gogh" → "painting"). A memorized caption
  has no such parent, so the default anchors are the *retain* prompts. On the testbed these are
  captions/general_train.csv (shapes); the memorized emoji are then pushed towards the general-caption output
  domain. The testbed's same-style emoji captions (captions/non_memorized_same_style.csv) would be the closer
  anchor, but `memprune evaluate` scores that file as its same-style control group, so we do not use it by
  default. If you pass it with --anchors, evaluate's control group is no longer held out: say so when you report.
  With --anchors the anchor *prompts* steer the discriminator's real domain, while the retention still uses the
  retain images and captions (the port has no separate anchor images; the re-implementation generates them from
  the anchor prompts).
- **Noisy latents.** x_t for the memorized/anchor pair is noised from a retain latent (the public code noises
  its anchor images). Because the anchors default to the retain prompts, these are the anchors' own images. The
  timesteps are drawn from the noisier part [unlearn_t_min · T, T), default the upper half. The public code's
  runs use t = 999 only ("use_random_latent"), and memorization is decided in the first, noisiest sampling
  steps. At low t the x_t would already fix the image, so D would see little of the prompt.
- **x̂0.** The clean latent implied by the prediction (epsilon, v or sample, by the scheduler's prediction type;
  `memprune.finetune.predicted_x0`), in latent space (not decoded: cheaper, and what the issue asks).
- **Discriminator.** Conv(C→w, 3) · LeakyReLU · Conv(w→2w, 4, stride 2) · LeakyReLU · Conv(2w→2w, 3) · LeakyReLU
  · global average pool · Linear(2w→1); w = `discriminator_width` (32). Adam lr `discriminator_lr` (5e-4, the
  public code's dlr), betas (0.5, 0.999) as usual for GANs. It is initialised from `seed` and updated once per
  step, before the student's generator loss is computed (as in the public code). `discriminator_warmup` (default
  10 % of the steps, 20 of the default 200; the public code uses 500 of 1000) trains D alone first. During the
  warm-up the student trains on the retention loss only.
- **Surgery scope.** `surgery_scope="parameter"` (default): per parameter tensor (as the public code does per
  parameter), so one layer's conflict does not bend another's gradient. `"global"`: one cosine over all trained
  parameters flattened. The public code compares normalised gradients and subtracts dot·ĝ_r. We use the formula
  as the paper and the issue state it (the projection of g_u onto g_r, unnormalised).
- **Loss weights.** Retain weight 1, `unlearn_weight` 1. The shared loop clips the summed gradient's norm.
- **Batches.** The memorized, anchor and x_t draws come from their own generator (`seed + 1`). The shared
  loop's retain batches, noise and timesteps are then the same as the plain control's for the same seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..conditioning import encode_conditioning
from ..errors import MemPruneError
from ..finetune import FinetuneHooks, FinetuneResult, FinetuneSettings, RetainData, predicted_x0, run_finetune
from ..retain import sample_prompts
from .base import MethodInfo

METHOD = MethodInfo(
    name="doco", kind="finetune",
    summary="Adversarial concept-domain correction of memorized prompts towards anchors, with a retain loss and "
            "concept-preserving gradient surgery.",
    reference="Wu et al. 2024, DoCo, arXiv 2405.15304",
)
SCOPES = ("parameter", "global")
RETENTIONS = ("noise", "distill")
DEFAULT_PARAMS = "xattn"  # all of cross-attention (memprune finetune --params)


@dataclass
class DoCoSettings:
    unlearn_weight: float = 1.0  # weight of the generator (unlearning) loss's gradient
    discriminator_lr: float = 5e-4
    discriminator_width: int = 32
    discriminator_warmup: int | None = None  # steps that train D only (None: 10 % of the run's steps)
    unlearn_t_min: float = 0.5  # memorized/anchor timesteps from [t_min * T, T)
    surgery: bool = True
    surgery_scope: str = "parameter"  # "parameter" or "global"
    anchor_prompts: int | None = 128  # seeded sample of the anchor file (None: all)
    retention: str = "noise"  # "noise": diffusion loss to the sampled noise; "distill": match the teacher

    def __post_init__(self):
        if self.retention not in RETENTIONS:
            raise MemPruneError(f"DoCo retention must be one of {', '.join(RETENTIONS)}, got '{self.retention}'.")
        if self.surgery_scope not in SCOPES:
            raise MemPruneError(f"DoCo surgery_scope must be one of {', '.join(SCOPES)}, got '{self.surgery_scope}'.")
        if not 0 <= self.unlearn_t_min < 1:
            raise MemPruneError(f"DoCo unlearn_t_min must be in [0, 1), got {self.unlearn_t_min}.")
        if (self.discriminator_warmup or 0) < 0 or self.discriminator_width < 1:
            raise MemPruneError("DoCo discriminator_warmup must be >= 0 and discriminator_width >= 1.")


def default_settings() -> DoCoSettings:
    return DoCoSettings()


def settings_from_options(options: dict) -> DoCoSettings:
    """DoCo's settings for `memprune finetune` (--retention; its anchors are an input, not a setting)."""
    return DoCoSettings(retention=options.get("retention") or "noise")


def surgery(g_unlearn: torch.Tensor, g_retain: torch.Tensor) -> torch.Tensor:
    """Concept-preserving gradient: if cos(g_u, g_r) < 0, g_u - (g_u·g_r / ‖g_r‖²) g_r; else g_u unchanged."""
    dot = torch.sum(g_unlearn.double() * g_retain.double())
    norm2 = torch.sum(g_retain.double().square())
    if norm2 == 0 or dot >= 0:
        return g_unlearn.clone()
    return (g_unlearn.double() - (dot / norm2) * g_retain.double()).to(g_unlearn.dtype)


class LatentDiscriminator(nn.Module):
    """Real (anchor domain) vs fake (memorized, student) from a predicted clean latent; one logit."""

    def __init__(self, channels: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.LeakyReLU(0.2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


class DoCoHooks(FinetuneHooks):
    default_params = DEFAULT_PARAMS

    def __init__(self, settings: DoCoSettings, memorized_prompts: list[str], anchor_prompts: list[str] | None):
        self.settings = settings
        self.retain_target = "data" if settings.retention == "noise" else "teacher"
        self.memorized_prompts = list(memorized_prompts)
        self.anchor_prompts = anchor_prompts
        self.d_history: list[dict] = []
        self.warmup = 0
        self.conflicts = 0
        self.compared = 0

    def setup(self, loop) -> None:
        self.memorized = encode_conditioning(loop.pipe, self.memorized_prompts, size=loop.settings.size)
        if self.anchor_prompts is None:
            self.anchors = loop.retain.conditioning  # default anchors: the retain prompts
        else:
            self.anchors = encode_conditioning(
                loop.pipe, sample_prompts(self.anchor_prompts, self.settings.anchor_prompts, loop.settings.seed),
                size=loop.settings.size)
        warmup = self.settings.discriminator_warmup
        self.warmup = loop.settings.steps // 10 if warmup is None else warmup
        self.generator = torch.Generator("cpu").manual_seed(loop.settings.seed + 1)
        self.rng = np.random.default_rng(loop.settings.seed + 1)
        channels = loop.retain.latents.shape[1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(loop.settings.seed)
            self.discriminator = LatentDiscriminator(channels, self.settings.discriminator_width).to(loop.device)
        self.optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=self.settings.discriminator_lr,
                                          betas=(0.5, 0.999))

    def _pair(self, loop):
        n = loop.settings.batch_size
        memorized = torch.from_numpy(self.rng.choice(len(self.memorized), size=n, replace=len(self.memorized) < n))
        anchors = torch.from_numpy(self.rng.choice(len(self.anchors), size=n, replace=len(self.anchors) < n))
        base = torch.from_numpy(self.rng.choice(len(loop.retain.latents), size=n, replace=len(loop.retain.latents) < n))
        x0 = loop.retain.latents[base].to(loop.device)
        total = loop.scheduler.config.num_train_timesteps
        t = torch.randint(int(self.settings.unlearn_t_min * total), total, (n,), generator=self.generator)
        noise = torch.randn(x0.shape, generator=self.generator).to(x0)
        return loop.noised(x0, noise, t), t, self.memorized.select(memorized), self.anchors.select(anchors)

    def losses(self, loop, step):
        x_t, t, memorized, anchors = self._pair(loop)
        student = predicted_x0(loop.scheduler, x_t, t, loop.predict(x_t, t, memorized))
        anchor = predicted_x0(loop.scheduler, x_t, t, loop.teacher_predict(x_t, t, anchors))
        # Discriminator step first (on detached inputs), then the student's generator loss against the updated D.
        with torch.enable_grad():
            real, fake = self.discriminator(anchor.detach()), self.discriminator(student.detach())
            loss_d = (F.binary_cross_entropy_with_logits(real, torch.zeros_like(real))
                      + F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake)))
            if not torch.isfinite(loss_d):
                raise MemPruneError(f"The DoCo discriminator loss became {loss_d.item()} at step {step}: nothing was "
                                    "saved; lower the discriminator learning rate.")
            self.optimizer.zero_grad(set_to_none=True)
            loss_d.backward()
            self.optimizer.step()
        accuracy = float(((real < 0).sum() + (fake > 0).sum()) / (real.numel() + fake.numel()))
        self.d_history.append({"step": step, "discriminator_loss": float(loss_d.detach()), "accuracy": accuracy})
        if step < self.warmup or self.settings.unlearn_weight == 0:
            return {}
        logits = self.discriminator(student)
        return {"unlearn": F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits))}

    def combine(self, grads, step):
        retain, unlearn = grads["retain"], grads["unlearn"]
        weight = self.settings.unlearn_weight
        if not self.settings.surgery:
            return {name: retain[name] + weight * unlearn[name] for name in retain}
        if self.settings.surgery_scope == "global":
            names = list(retain)
            flat_u = torch.cat([unlearn[n].flatten() for n in names])
            flat_r = torch.cat([retain[n].flatten() for n in names])
            adjusted = surgery(flat_u, flat_r)
            self.compared += 1
            self.conflicts += int(not torch.equal(adjusted, flat_u))
            out, offset = {}, 0
            for n in names:
                size = retain[n].numel()
                out[n] = retain[n] + weight * adjusted[offset:offset + size].view_as(retain[n])
                offset += size
            return out
        out = {}
        for name in retain:
            adjusted = surgery(unlearn[name], retain[name])
            self.compared += 1
            self.conflicts += int(not torch.equal(adjusted, unlearn[name]))
            out[name] = retain[name] + weight * adjusted
        return out

    def info(self) -> dict:
        last = self.d_history[-20:]
        return {
            "discriminator_accuracy_last20": float(np.mean([r["accuracy"] for r in last])) if last else None,
            "discriminator_loss_last20": float(np.mean([r["discriminator_loss"] for r in last])) if last else None,
            "surgery_conflict_share": self.conflicts / self.compared if self.compared else None,
            "discriminator_warmup_steps": self.warmup,
            "anchors": "retain prompts" if self.anchor_prompts is None else f"{len(self.anchors)} anchor prompts",
            "retention": "diffusion loss to the sampled noise on the retain (anchor) images"
            if self.settings.retention == "noise" else "distillation of the frozen teacher",
        }


def train(pipe, settings: FinetuneSettings, method_settings: DoCoSettings | None = None,
          memorized_prompts: list[str] | None = None, retain: RetainData | None = None,
          anchor_prompts: list[str] | None = None, **_) -> FinetuneResult:
    method_settings = method_settings or DoCoSettings()
    if not memorized_prompts:
        raise MemPruneError("DoCo needs the memorized captions (--memorized FILE) to unlearn.")
    if retain is None:
        raise MemPruneError("DoCo needs retain data to fine-tune on.")
    hooks = DoCoHooks(method_settings, memorized_prompts, anchor_prompts)
    delta, history = run_finetune(pipe, settings, retain, hooks, desc="DoCo")
    if hooks.d_history:
        history = history.merge(
            pd.DataFrame(hooks.d_history)[["step", "discriminator_loss"]], on="step", how="left")
    return FinetuneResult(delta=delta, history=history, info=hooks.info())


def finetune(pipe, settings: FinetuneSettings, **inputs) -> dict[str, torch.Tensor]:
    """The finetune entry point: the weight delta (the pipeline is left unchanged)."""
    return train(pipe, settings, **inputs).delta
