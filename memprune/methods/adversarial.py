"""Adversarial fine-tuning: DoRI's mitigation (Kowalczuk et al., arXiv 2507.16880, "Finding Dori").

DoRI showed that pruning hides memorized images from their prompts while a small change of the prompt's text
embedding brings them back, and that fine-tuning *against* that search holds where pruning does not. Each round:

1. **Attack.** For every memorized caption with a training image, memprune.attack.embedding.attack_prompt (the
   same attack `memprune attack` runs, with its DoRI defaults: Adam lr 0.1, 8 (t, ε) draws per step, unbounded,
   started from the prompt) optimises a perturbation δ of its token embeddings e toward the training image on the
   *current* model: e + δ is an embedding that brings the copy back. DoRI hardens against the attack it then
   evaluates with; a weaker round attack leaves the model open to the stronger one (measured in the README).
2. **Fine-tune.** The shared loop of memprune.finetune runs `steps` optimiser steps with two losses, each with its
   own gradient, summed (the loop's default combination), then clipped:
   - ``retain``: the loop's standard diffusion loss on its retain data (general captions), which keeps the model
     on general data;
   - ``adversarial``: the diffusion loss toward the memorized caption's *surrogate* latent s (below) under both
     the attacked embedding e + δ and the original e, the same x_t = add_noise(s, ε, t) and target for both rows,
     t ~ U{0..T-1}, ``batch_size`` memorized captions per step (drawn seeded, with replacement when fewer),
     weighted by ``adversarial_weight`` (1).
   The round's delta is added to the pipeline and the next round attacks the updated model.

**The surrogate** (the model's own non-copy generation, fixed for the whole run, computed before round 1):
- ``surrogate="prompt"``: the starting model's own generation for the memorized caption (one seed, ``seed``, the
  retain generation's sampler settings). This is DoRI's target: they harden an edited (pruned) model, whose
  generation for the original prompt is no longer a copy. The default with ``--from DIR`` (an edit of --model).
- ``surrogate="retain"``: a retain latent (the starting model's generation of a general caption), one per
  memorized caption by a seeded permutation, the same one every step. From the unedited model the caption's own
  generation *is* the copy, so a general caption's generation is the closest non-copy output the run has without
  new inputs. The default without ``--from``. (The testbed's same-style captions would be closer in style, but
  `memprune evaluate` scores them as its held-out control group, as DoCo's notes say.)

**Parameters.** The loop's `--params` default for this method is K/V of cross-attention (kv); DoRI fine-tunes the
denoiser (LoRA did not work for them), which is `--params unet` and the field preset's setting. On the ε-testbed
K/V with the bounded round attack came back to 100% under attack, the whole UNet with DoRI's round attack to 0% at
a large utility cost (README). The kv default is kept for its low cost and the published testbed row.

Other choices: each round is one call of the shared loop with a fresh Adam (DoRI alternates search and fine-tune;
moment estimates of the previous round's embeddings do not carry over), seeded with ``seed + round`` so rounds
draw different retain batches; each round's attack is ``round_attack`` (default: `memprune attack`'s DoRI settings;
BOUNDED_ROUND_ATTACK, lr 0.01, bound 0.25 · ‖e‖, 4 draws, is the weaker one this method used until 2026-12-05)
with ``attack_steps`` per round and ``attack_seed = seed + round``. The run
costs rounds · (attack_steps · prompts + steps) denoiser passes (of batches); DoRI's own budget on SD 1.4 was not
available to us. Captions without a training image are not attacked and trained on their original embedding
only. A non-finite loss stops the run (the loop's check) and a non-finite perturbation stops the attack: nothing is
saved. The pipeline given to `train` is left unchanged (the methods package contract): every round's delta is
undone at the end and the summed delta returned.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..attack.embedding import AttackSettings, attack_prompt
from ..conditioning import STATES, Conditioning, asked_size, encode_conditioning, rows_of
from ..errors import MemPruneError
from ..finetune import FinetuneHooks, FinetuneResult, FinetuneSettings, RetainData, apply_delta, run_finetune
from ..models import denoiser
from .base import MethodInfo

# --round-attack: "dori" is `memprune attack`'s (the default); "bounded" the weaker one used until 2026-12-05.
BOUNDED_ROUND_ATTACK = AttackSettings(attack_lr=0.01, bound=0.25, noise_samples=4)
ROUND_ATTACKS = {"dori": AttackSettings(), "bounded": BOUNDED_ROUND_ATTACK}

METHOD = MethodInfo(
    name="adversarial", kind="finetune",
    summary="Adversarial fine-tuning (DoRI's mitigation): rounds of the embedding attack on the memorized images, "
            "then fine-tuning so attacked and original embeddings produce a non-copy surrogate, with a retain loss.",
    reference="Kowalczuk et al. 2025, Finding Dori, arXiv 2507.16880",
)
SURROGATES = ("prompt", "retain")


@dataclass
class AdversarialSettings:
    rounds: int = 2  # attack + fine-tune rounds (each runs the loop's --steps)
    attack_steps: int = 50  # Adam steps of the attack per prompt and round (the attack's default budget)
    surrogate: str = "retain"  # "prompt": the starting model's own generation; "retain": a retain latent
    adversarial_weight: float = 1.0
    round_attack: AttackSettings = field(default_factory=AttackSettings)  # its attack_steps/seed are set per round

    def __post_init__(self):
        if self.rounds < 1:
            raise MemPruneError(f"--rounds must be at least 1, got {self.rounds}.")
        if self.attack_steps < 1:
            raise MemPruneError(f"--attack-steps must be at least 1 with --method adversarial (got "
                                f"{self.attack_steps}): without an attack there is no adversarial embedding to "
                                "fine-tune against.")
        if self.surrogate not in SURROGATES:
            raise MemPruneError(f"Adversarial surrogate must be one of {', '.join(SURROGATES)}, "
                                f"got '{self.surrogate}'.")
        if not self.adversarial_weight > 0:
            raise MemPruneError(f"Adversarial weight must be > 0, got {self.adversarial_weight}.")


def default_settings() -> AdversarialSettings:
    return AdversarialSettings()


def settings_from_options(options: dict) -> AdversarialSettings:
    """--rounds, --attack-steps and --round-attack (None: the defaults); the surrogate follows --from (module
    docstring)."""
    if options.get("anchors") is not None:
        raise MemPruneError("--anchors is used by --method doco only.")
    defaults = default_settings()
    rounds, steps = options.get("rounds"), options.get("attack_steps")
    name = options.get("round_attack")
    round_attack = defaults.round_attack if name is None else ROUND_ATTACKS[name]
    return AdversarialSettings(rounds=defaults.rounds if rounds is None else rounds,
                               attack_steps=defaults.attack_steps if steps is None else steps,
                               surrogate="prompt" if options.get("from_dir") else "retain", round_attack=round_attack)


# --------------------------------------------------------------------------------------------------------------
# Surrogates and attacks
# --------------------------------------------------------------------------------------------------------------


def surrogate_latents(pipe, prompts: list[str], retain: RetainData, surrogate: str,
                      settings: FinetuneSettings) -> torch.Tensor:
    """(N, C, h, w) the clean latent each memorized caption is trained toward (module docstring)."""
    if surrogate == "retain":
        order = np.random.default_rng(settings.seed + 2).permutation(len(retain.latents))
        return retain.latents[torch.from_numpy(order[np.arange(len(prompts)) % len(order)])].clone()
    from ..generate import GenerationSettings, generate

    generation = GenerationSettings(steps=settings.sampling_steps, seeds=1, seed=settings.seed,
                                    guidance_scale=settings.guidance_scale, batch_size=8, height=settings.height,
                                    width=settings.width)
    latents = {index: latent.detach().float() for index, _, latent in generate(
        pipe, prompts, generation, output_type="latent", progress=settings.progress, desc="surrogate latents")}
    return torch.stack([latents[i] for i in range(len(prompts))])


def attacked_embeddings(pipe, memorized: Conditioning, images: list[torch.Tensor | None],
                        attack: AttackSettings, progress: bool = False,
                        desc: str = "attack") -> tuple[torch.Tensor, list[dict]]:
    """(N, T, D) e + δ per memorized caption on the pipeline as it is now (e where there is no image); the attack's
    objective before and after, per attacked caption."""
    embeddings, records = memorized.cond.detach().clone(), []
    attacked = [(i, image) for i, image in enumerate(images) if image is not None]
    bar = tqdm(attacked, desc=desc, disable=not progress, leave=False)
    for i, image in bar:
        one = Conditioning(memorized.select(torch.tensor([i])), None, [memorized.prompts[i]])
        result = attack_prompt(pipe, memorized.prompts[i], image, attack, one)
        bar.set_postfix(objective=f"{result.loss_after:.4f}")
        embeddings[i] = embeddings[i] + result.delta[0].to(embeddings)
        records.append({"prompt_index": i, "objective_before": result.loss_before,
                        "objective_after": result.loss_after, "perturbation_norm_relative": result.relative_norm})
    return embeddings, records


class AdversarialHooks(FinetuneHooks):
    """One round's extra loss: attacked and original embeddings of memorized captions -> their surrogate."""

    def __init__(self, memorized: Conditioning, attacked: torch.Tensor, surrogates: torch.Tensor, weight: float,
                 seed: int):
        self.memorized, self.attacked, self.surrogates, self.weight = memorized, attacked, surrogates, weight
        self.seed = seed

    def setup(self, loop) -> None:
        # Own draws, so the loop's retain batches, noise and timesteps are the plain control's for the same seed.
        self.generator = torch.Generator("cpu").manual_seed(self.seed + 1)
        self.rng = np.random.default_rng(self.seed + 1)

    def losses(self, loop, step: int) -> dict[str, torch.Tensor]:
        n, count = loop.settings.batch_size, len(self.memorized)
        idx = torch.from_numpy(self.rng.choice(count, size=n, replace=count < n))
        x0 = self.surrogates[idx].to(loop.device)
        noise = torch.randn(x0.shape, generator=self.generator).to(x0)
        t = torch.randint(0, loop.scheduler.config.num_train_timesteps, (n,), generator=self.generator)
        x_t, target = loop.noised(x0, noise, t), loop.target(x0, noise, t).float()
        # Rows [attacked; original]: the same captions' other entries (pooled embeddings, time ids) twice.
        rows = rows_of(self.memorized.kwargs, torch.cat([idx, idx]), count)
        rows[STATES] = torch.cat([self.attacked[idx].to(loop.device), self.memorized.cond[idx].to(loop.device)])
        prediction = loop.predict(torch.cat([x_t, x_t]), torch.cat([t, t]), rows)
        return {"adversarial": self.weight * F.mse_loss(prediction, torch.cat([target, target]))}


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------


def load_images(pipe, paths: list[str | None] | None, count: int,
                size: tuple[int, int] | None = None) -> list[torch.Tensor | None]:
    """The training image of each memorized caption at `size` (default: the pipeline's; None where the file names
    none)."""
    from ..similarity import load_image

    paths = list(paths) if paths is not None else [None] * count
    size = asked_size(pipe, *(size or (None, None)))
    return [load_image(path, size) if path else None for path in paths]


def train(pipe, settings: FinetuneSettings, method_settings: AdversarialSettings | None = None,
          memorized_prompts: list[str] | None = None, memorized_images: list[str | None] | None = None,
          retain: RetainData | None = None, **_) -> FinetuneResult:
    method_settings = method_settings or AdversarialSettings()
    if not memorized_prompts:
        raise MemPruneError("Adversarial fine-tuning needs the memorized captions (--memorized FILE).")
    if retain is None:
        raise MemPruneError("Adversarial fine-tuning needs retain data to fine-tune on.")
    # At the retain data's size (--height/--width): images, conditioning and surrogates are one size.
    images = load_images(pipe, memorized_images, len(memorized_prompts), settings.size)
    if not any(image is not None for image in images):
        raise MemPruneError("Adversarial fine-tuning attacks each memorized caption toward its training image: give "
                            "--memorized a file with an image column.")
    memorized = encode_conditioning(pipe, memorized_prompts, size=settings.size)
    surrogates = surrogate_latents(pipe, memorized_prompts, retain, method_settings.surrogate, settings)
    params = dict(denoiser(pipe).named_parameters())
    start: dict[str, torch.Tensor] = {}  # the pipeline's weights before round 1, of the trained parameters
    total: dict[str, torch.Tensor] = {}
    histories, attacks = [], []
    try:
        for round_ in range(method_settings.rounds):
            attack = dataclasses.replace(method_settings.round_attack, attack_steps=method_settings.attack_steps,
                                         attack_seed=settings.seed + round_)
            attacked, records = attacked_embeddings(
                pipe, memorized, images, attack, progress=settings.progress,
                desc=f"adversarial round {round_ + 1}/{method_settings.rounds}: attack")
            attacks += [{"round": round_, **record} for record in records]
            round_settings = dataclasses.replace(settings, seed=settings.seed + round_)
            hooks = AdversarialHooks(memorized, attacked, surrogates, method_settings.adversarial_weight,
                                     round_settings.seed)
            delta, history = run_finetune(pipe, round_settings, retain, hooks,
                                          desc=f"adversarial round {round_ + 1}/{method_settings.rounds}")
            for name in delta:
                start.setdefault(name, params[name].detach().clone())
            apply_delta(pipe, delta)  # the next round attacks the updated model
            histories.append(history.assign(round=round_, step=history.step + round_ * settings.steps))
        total = {name: (params[name].detach() - value).cpu() for name, value in start.items()}
    finally:
        with torch.no_grad():
            for name, value in start.items():
                params[name].copy_(value)
    frame = pd.DataFrame(attacks)
    info = {"rounds": method_settings.rounds, "attack_steps": method_settings.attack_steps,
            "surrogate": method_settings.surrogate,
            "round_attack": {key: getattr(method_settings.round_attack, key)
                             for key in ("attack_lr", "bound", "noise_samples", "init")},
            "attacked_prompts": int(frame.prompt_index.nunique()),
            "attack_objective_by_round": frame.groupby("round").objective_after.mean().round(6).tolist()}
    return FinetuneResult(delta=total, history=pd.concat(histories, ignore_index=True), info=info)


def finetune(pipe, settings: FinetuneSettings, **inputs) -> dict[str, torch.Tensor]:
    """The finetune entry point: the weight delta (the pipeline is left unchanged)."""
    return train(pipe, settings, **inputs).delta
