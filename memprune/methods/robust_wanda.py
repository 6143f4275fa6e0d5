"""Attack-aware pruning: Wanda masks grown, round by round, by what the embedding attack brings back.

DoRI (Kowalczuk et al., arXiv 2507.16880) found that a Wanda prune hides memorized images from their prompts while
a small change of the prompts' text embedding brings them back. This method locates again *under* that change.
No paper describes it; it is our construction, and whether it beats a random mask of the same size is measured,
not assumed (rounds.csv records the mask size of every round for that comparison).

- **Round 0** is the Wanda mask `memprune locate` wrote (from the prompts, as always).
- **Each round r = 1..K**: zero the current mask's union over steps 0..τ-1 (memprune.prune.apply_masks, τ =
  prune's --timesteps); run the attack (memprune.attack.embedding.attack_prompt, ``attack_steps`` Adam steps,
  seed ``attack_seed``, the attack's other defaults) on each located memorized prompt toward its training image;
  record the FeedForward activations of generations from the attacked embeddings e + δ
  (memprune.locate.record_embeddings; locate's steps, seeds, guidance and CFG half) and of locate's reference
  prompts on the same pruned model; select with Wanda (locate's ratio or k per row) on the *pruned* weights, so
  already-zeroed weights score 0 and the top-k goes to the next ones; add the selection to the mask per
  (layer, step). The mask only grows (a union), so round r+1's mask contains round r's.
- **Scoring, every round 0..K** (rounds.csv, K+1 rows): the mask size (weights zeroed, union over τ steps), the
  attack's objective after optimisation, and the copy similarity (SSIM) to the training image of generations
  from the prompt (baseline) and from the attacked embedding, on fresh seeds (from 1000, as `memprune attack`).
  These are the located prompts themselves; the held-out claim is for `memprune attack --exclude-prompts`.

The pipeline given to `edit` is left unchanged (every round's zeroing is undone).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..errors import MemPruneError
from ..generate import GenerationSettings
from ..masks import Masks
from ..record import Half
from .base import MethodInfo
from .wanda import SelectionSettings

METHOD = MethodInfo(
    name="robust-wanda", kind="weight_edit", stage="prune",
    summary="Attack-aware Wanda: prune, attack the pruned model, add the Wanda selection under the attacked "
            "embeddings to the mask; K rounds (our construction, measured against a random mask of the same size).",
    reference="Chavhan et al. 2024 (Wanda masks) + Kowalczuk et al. 2025, Finding Dori, arXiv 2507.16880 (attack)",
)
SCORE_SEED = 1000  # first fresh seed of the scored generations (memprune.attack.run.GENERATION_SEED)


@dataclass
class RobustSettings:
    rounds: int = 2  # K: attack + re-locate rounds after the Wanda mask
    attack_steps: int = 50  # Adam steps of the attack per prompt and round
    attack_seed: int = 0  # the same (t, ε) draws every round, so rounds face the same attack
    timesteps: int = 10  # τ: the mask zeroed is the union over steps 0..τ-1 (prune's --timesteps)

    def __post_init__(self):
        if self.rounds < 1:
            raise MemPruneError(f"--rounds must be at least 1 with --method robust-wanda, got {self.rounds}.")
        if self.attack_steps < 1:
            raise MemPruneError(f"--attack-steps must be at least 1 with --method robust-wanda (got "
                                f"{self.attack_steps}): without an attack there is nothing to add to the mask.")
        if self.timesteps < 1:
            raise MemPruneError(f"--timesteps must be at least 1, got {self.timesteps}.")


def settings_from_options(options: dict) -> RobustSettings:
    """--rounds (default 2), --attack-steps (default 50) and prune's --timesteps."""
    defaults = RobustSettings()
    rounds, steps = options.get("rounds"), options.get("attack_steps")
    return RobustSettings(rounds=defaults.rounds if rounds is None else rounds,
                          attack_steps=defaults.attack_steps if steps is None else steps,
                          timesteps=options.get("timesteps") or defaults.timesteps)


@dataclass
class LocatedWith:
    """How `memprune locate` recorded the round-0 mask (from its masks.json), reused by every round."""

    generation: GenerationSettings
    selection: SelectionSettings
    half: Half = "both"
    reference: str = "empty"

    @classmethod
    def from_masks(cls, masks: Masks, source: str = "the masks") -> LocatedWith:
        settings = masks.meta.get("settings", {})
        selection = masks.meta.get("selection")
        if "generation" not in settings or not isinstance(selection, dict) or "granularity" not in selection:
            raise MemPruneError(f"{source} were not written by `memprune locate --method wanda` (no recorded "
                                "generation and Wanda selection settings): robust-wanda starts from a Wanda masks "
                                "folder.")
        return cls(GenerationSettings(**settings["generation"]), SelectionSettings(**selection),
                   settings.get("half", "both"), settings.get("reference", "empty"))


@dataclass
class RobustResult:
    masks: Masks  # the final mask (round K)
    rounds: pd.DataFrame  # K+1 rows (module docstring)
    history: list[Masks] = field(default_factory=list)  # the mask of every round 0..K


def union(a: Masks, b: Masks) -> Masks:
    """Per (layer, step), the sorted union of both masks' indices (keys of either)."""
    indices = dict(a.indices)
    for key, idx in b.indices.items():
        indices[key] = torch.unique(torch.cat([indices[key], idx])) if key in indices else idx
    return Masks(indices=indices, shapes={**a.shapes, **b.shapes}, meta=dict(a.meta))


def contains(outer: Masks, inner: Masks) -> bool:
    """Every index of `inner` is in `outer`, per (layer, step)."""
    return all(key in outer.indices and bool(torch.isin(idx, outer.indices[key]).all())
               for key, idx in inner.indices.items())


def _attack_and_score(pipe, conditioning, images, settings: RobustSettings, located: LocatedWith, size, backend,
                      progress: bool, desc: str) -> tuple[list[torch.Tensor], dict]:
    """Attack every prompt on the pipeline as it is; its attacked embeddings and the round's scores."""
    from ..attack.embedding import AttackSettings, attack_prompt, generate_from_embeddings
    from ..locate import one_prompt

    attack = AttackSettings(attack_steps=settings.attack_steps, attack_seed=settings.attack_seed)
    generation = located.generation
    scoring = GenerationSettings(steps=generation.steps, seeds=generation.seeds, seed=SCORE_SEED,
                                 guidance_scale=generation.guidance_scale)
    attacked: list[torch.Tensor] = []
    objective: list[float] = []
    baseline: list[float] = []
    under_attack: list[float] = []
    for i in tqdm(range(len(conditioning)), desc=desc, disable=not progress, leave=False):
        one = one_prompt(conditioning, i)
        result = attack_prompt(pipe, conditioning.prompts[i], images[i], attack, one)
        cond = one.cond + result.delta.to(one.cond)
        attacked.append(cond)
        objective.append(result.loss_after)
        target = backend.features(images[i][None])
        for embedding, scores in ((one.cond, baseline), (cond, under_attack)):
            feats = backend.features(generate_from_embeddings(pipe, one, embedding, scoring, size))
            scores.append(float(backend.paired(feats, target.expand_as(feats)).double().mean()))
    return attacked, {"attack_objective": sum(objective) / len(objective),
                      "copy_similarity": sum(baseline) / len(baseline),
                      "copy_similarity_attacked": sum(under_attack) / len(under_attack)}


def robust_rounds(pipe, settings: RobustSettings, wanda_masks: Masks, prompts: list[str],
                  images: list[torch.Tensor], progress: bool = True) -> RobustResult:
    """The rounds of the module docstring; `images` are the prompts' training images (3, H, W) in [0, 1]."""
    from ..conditioning import default_size, encode
    from ..locate import record_embeddings, record_prompts, reference_prompts
    from ..models import denoiser, output_linears
    from ..prune import apply_masks, undo
    from ..similarity import make_backend
    from .wanda import select

    if not prompts or len(prompts) != len(images):
        raise MemPruneError("robust-wanda needs every located memorized prompt with its training image.")
    located = LocatedWith.from_masks(wanda_masks)
    if settings.timesteps > len(wanda_masks.steps):
        raise MemPruneError(f"--timesteps {settings.timesteps} is larger than the {len(wanda_masks.steps)} steps "
                            f"recorded in the masks: use at most {len(wanda_masks.steps)}.")
    size = default_size(pipe)
    backend = make_backend("ssim")
    with torch.no_grad():
        conditioning = encode(pipe, prompts, None, size)
    weights = {name: linear.weight for name, linear in output_linears(denoiser(pipe)).items()}
    reference = reference_prompts(located.reference, len(prompts), 0)
    current, history, rows = wanda_masks, [wanda_masks], []
    for round_ in range(settings.rounds + 1):
        tic = time.perf_counter()
        applied = apply_masks(pipe, current, settings.timesteps)
        try:
            attacked, scores = _attack_and_score(pipe, conditioning, images, settings, located, size, backend,
                                                 progress, f"robust-wanda round {round_}: attack")
            added = 0
            if round_ < settings.rounds:
                memorized = record_embeddings(pipe, conditioning, attacked, located.generation,
                                              located.half, progress=progress)
                reference_stats = record_prompts(pipe, reference, located.generation, located.half,
                                                 desc="reference", progress=progress)
                found = select(weights, memorized, reference_stats, located.selection,
                               steps=current.steps)
                grown = union(current, found)
                added = sum(grown.union_indices(settings.timesteps)[layer].numel() for layer in grown.layers) \
                    - applied.total_zeroed
        finally:
            undo(pipe, applied)
        rows.append({"round": round_, "mask_size": applied.total_zeroed, **scores,
                     "seconds": time.perf_counter() - tic})
        if round_ < settings.rounds:
            rows[-1]["added_next"] = added
            current = grown
            history.append(current)
    final = Masks(current.indices, current.shapes, {
        **wanda_masks.meta, "selection": {**wanda_masks.meta.get("selection", {}), "method": METHOD.name},
        "robust": {"rounds": settings.rounds, "attack_steps": settings.attack_steps,
                   "attack_seed": settings.attack_seed, "timesteps": settings.timesteps,
                   "wanda_selection": wanda_masks.meta.get("selection", {})}})
    return RobustResult(final, pd.DataFrame(rows), history)


def edit(pipe, settings: RobustSettings, wanda_masks: Masks | None = None, prompts: list[str] | None = None,
         images: list[torch.Tensor] | None = None, **_) -> Masks:
    """The weight-edit entry point: the final mask of `robust_rounds` (the pipeline is left unchanged)."""
    if wanda_masks is None:
        raise MemPruneError("robust-wanda starts from Wanda masks: give --masks, the output folder of "
                            "`memprune locate`.")
    return robust_rounds(pipe, settings, wanda_masks, prompts or [], images or []).masks
