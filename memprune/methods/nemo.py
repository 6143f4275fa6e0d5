"""NeMo (Hintersdorf et al., NeurIPS 2024): memorization neurons of the cross-attention value projections.

What it records. NeMo's neurons are the output units of the *value projection* `to_v` of every cross-attention
(diffusers `Attention` modules with `is_cross_attention`, found by type; in SD's UNet these are the `attn2.to_v`
Linears). Their input is the text embedding, so a neuron's activation depends on the prompt only, not on the seed
or the timestep. As in their code, the activation of neuron j for a prompt is the mean over the text tokens of
|to_v(c)|_j (their `activations.abs().mean(dim=0)`), recorded at the first denoiser call without guidance.

The method, per memorized prompt (their `3_detect_memorized_neurons.py`, our own code):
1. Statistics: per neuron, the mean and (sample) standard deviation of that activation over non-memorized prompts
   (float64, merged batch by batch with Chan's update, so memory does not grow with the prompt count).
2. Memorization criterion: the *noise difference* of a generation is the first-step ε-prediction minus the latent
   the denoiser was given, ε̂ − x_t, min-max scaled to [0, 1] per sample and channel. Theirs runs on SD 1.x, an
   ε-model, where ε̂ is the output; memprune converts any output to ε̂ through the scheduler's prediction_type
   (memprune.prediction): on a v-model the raw output minus x_t would measure something else (at zero terminal SNR
   its ε̂ is x_T itself, and the difference carries no image). For a memorized prompt the noise differences of
   different seeds look alike. A seed counts as memorized when its highest MS-SSIM (memprune.methods.nemo_ssim) to
   any other seed exceeds the threshold; prompts without such a seed are skipped (no neurons).
3. Threshold: the mean plus one standard deviation of the pairwise MS-SSIM between seeds of non-memorized prompts
   (their README: 0.428 on SD v1.4), calibrated here on `calibration_prompts` reference prompts by the criterion
   itself, so at the guidance detection uses (theirs: calibrated at guidance 7, detected at 0); or given.
4. Initial candidates: neurons with |z| > θ, z = (a - mean) / std, plus the top-k neurons by |a| per layer. θ starts
   at 5 and drops by 0.25 (k grows by 1) until deactivating the candidates breaks memorization: the highest SSIM,
   over the memorized seeds, between the noise difference with and without the candidates falls to the threshold.
5. Refinement: layer by layer (last layer first) give back a whole layer's candidates if memorization stays broken
   without them; then neuron by neuron in the remaining layers, keep only the neurons still needed.
6. Two scenarios from the same neurons. *Per prompt* (NeMo's own evaluation): each memorized prompt generated with its
   own refined neurons deactivated, scored on the memorized prompts themselves — the generation-time mitigation
   `memprune evaluate --mitigation nemo_prompt --nemo-neurons LOCATED` (memprune.methods.nemo_prompt), fed by the
   per-prompt neurons `edit` stores in masks.json. *Union* (this weight edit): the union over prompts is a neuron
   mask, whole rows of each `to_v` weight (`memprune prune` zeroes them; to_v has no bias in SD, so a zeroed row is
   exactly NeMo's deactivation, which sets the neuron's output to 0), scored on held-out prompts — a generalisation
   their paper does not claim.

Choices their paper/code leaves open or that we made differently (all in `NeMoSettings`):
- Layers: their code hooks the seven value layers of SD v1's down and mid blocks only (`layers="down_mid"`, the
  default here: every cross-attention inside the UNet's `down_blocks` and `mid_block`, found by module membership, so
  SDXL's extra transformer blocks count too); `layers="all"` adds the up blocks. A denoiser without down/mid blocks
  (DiT) uses all its cross-attentions.
- Which step: their loop never calls the scheduler, so it returns the prediction of the *second* timestep on the
  initial noise; we take the first denoiser call of an ordinary pipeline call (timestep t_0, latent x_T), stopped
  right after it. `steps` sets the scheduler's timesteps as their `num_inference_steps` does.
- Guidance: `guidance_scale` (`--guidance-scale`, default 1: none, the conditional prediction only, as their
  detection default guidance 0) is used by the criterion for the memorized prompts and the threshold alike; the
  activations (statistics and z-scores) are always recorded without guidance, as theirs.
- Similarity: their 3-scale MS-SSIM (torchmetrics' formula, 11-tap Gaussian window) where the latent has at least
  44 pixels a side; fewer scales on smaller latents and single-scale SSIM with a 7-tap window on the testbed's 8 × 8
  latents (memprune.methods.nemo_ssim says exactly when). Threshold comparisons are "≤ threshold = broken" (theirs:
  strict <).
- Seeds: `seeds` (their 10; `locate --method nemo` defaults --seeds to 10) consecutive seeds from `seed`; the
  memorized prompt's activations come from the first one (they depend on the prompt only).
- Reference prompts: all of `--reference` in a `--sample-seed` order for the statistics (theirs: 50k LAION
  prompts); the first `calibration_prompts` (50) of that order for the SSIM threshold.
- If θ reaches `min_theta` without breaking memorization, as in their code the candidates at `min_theta` are
  refined against the similarity they reach (they keep what does not make it worse); `refine_unbroken=False`
  (`--nemo-unbroken skip`) selects nothing for such a prompt instead. `nemo_prompts.csv` says which prompts broke.
- Identical candidate sets at successive θ are judged once (the criterion is deterministic), which saves calls.
- z-scores are two-sided |z| (their `.abs()`); `two_sided=False` keeps only neurons more active than usual. A neuron
  with zero reference std gets std 1e-12 (any deviation is an outlier).
- Masks are step-independent: the same rows are stored at every step 0..steps-1, so `memprune prune --timesteps τ`
  (any τ ≤ steps) zeroes exactly the NeMo set. Cost: the index file is `steps` times larger than one step.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import MemPruneError
from ..masks import Masks
from ..stats import Moments
from .base import MethodInfo
from .nemo_criterion import (
    Deactivated,
    ValueRecorder,
    first_step,
    max_pairwise_ssim,
    nemo_layers,
    noise_differences,
    pairwise_ssims,
)
from .nemo_search import NeMoSettings, Neurons, count, neuron_masks, refine, search_theta, union, zscores

METHOD = MethodInfo(
    name="nemo", kind="weight_edit",
    summary="NeMo: out-of-distribution cross-attention value neurons of each memorized prompt (z > θ vs non-memorized "
            "prompts), refined until deactivating them breaks the seed-to-seed SSIM of first-step noise differences.",
    reference="Hintersdorf et al., NeurIPS 2024, Finding NeMo: Localizing Neurons Responsible For Memorization in "
              "Diffusion Models",
)


def check_reference(reference: str | None) -> str:
    """NeMo's non-memorized prompts must be a file (statistics and SSIM threshold), never the empty prompt."""
    if reference is None or reference == "empty":
        raise MemPruneError("NeMo needs non-memorized prompts for its statistics and SSIM threshold: "
                            "give --reference FILE.")
    return reference


def settings_from_options(options: dict) -> NeMoSettings:
    """NeMoSettings from `memprune locate`'s options, refusing the options NeMo does not use."""
    if options.get("subsets"):
        raise MemPruneError("--subsets is an analysis of Wanda masks: run it with --method wanda.")
    if options.get("processes", 1) > 1 or options.get("resume") or options.get("height") or options.get("width"):
        raise MemPruneError("--processes, --resume, --height and --width are not supported with --method nemo yet.")
    check_reference(options.get("reference"))
    guidance = options.get("guidance_scale")
    seeds = options.get("seeds")
    return NeMoSettings(theta=options.get("theta", 5.0), min_theta=options.get("min_theta", 1.0),
                        theta_step=options.get("theta_step", 0.25), ssim_threshold=options.get("ssim_threshold"),
                        seeds=10 if seeds is None else seeds, seed=options.get("seed", 0),
                        steps=options.get("steps", 50), batch_size=options.get("batch_size", 8),
                        guidance_scale=1.0 if guidance is None else guidance,
                        layers=options.get("nemo_layers", "down_mid"),
                        refine_unbroken=options.get("nemo_unbroken", "refine") == "refine")


class NeMoRun:
    """One pipeline, its NeMo layers and settings: statistics, threshold and per-prompt localisation."""

    def __init__(self, pipe, settings: NeMoSettings, progress: bool = True):
        from ..models import denoiser

        self.pipe, self.settings, self.progress = pipe, settings, progress
        self.linears = nemo_layers(denoiser(pipe), settings.layers)
        self.calls = 0  # criterion pipeline calls, for the cost report

    def _chunks(self, items: list):
        size = self.settings.batch_size
        return [items[i:i + size] for i in range(0, len(items), size)]

    def reference_statistics(self, prompts: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if len(prompts) < 2:
            raise MemPruneError("NeMo needs at least 2 non-memorized prompts for its activation statistics.")
        moments = {name: Moments() for name in self.linears}
        with ValueRecorder(self.linears) as recorder:
            for batch in tqdm(self._chunks(prompts), desc="NeMo statistics (non-memorized)", disable=not self.progress,
                              leave=False):
                first_step(self.pipe, batch, [self.settings.seed] * len(batch), self.settings.steps)
                for name, rows in recorder.take().items():
                    moments[name].add(rows)
        statistics = {name: moment.mean_std() for name, moment in moments.items()}
        for name, (mean, std) in statistics.items():
            if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
                raise MemPruneError(f"Activations of {name} contain NaN or inf: run in float32 or check the weights.")
        return statistics

    def diffs(self, prompt: str, seeds: list[int], neurons: Neurons | None = None) -> torch.Tensor:
        parts = []
        with Deactivated(self.linears, neurons):
            for batch in self._chunks(seeds):
                self.calls += 1
                outputs = first_step(self.pipe, [prompt] * len(batch), batch, self.settings.steps,
                                     self.settings.guidance_scale)
                parts.append(noise_differences(*outputs))
        return torch.cat(parts)

    def calibrate_threshold(self, prompts: list[str]) -> tuple[float, dict]:
        """Mean + threshold_std × std of the pairwise similarity between seeds of non-memorized prompts (their 0.428),
        measured by the criterion itself (`diffs`), so at the guidance the memorized prompts are judged at."""
        seeds = self.all_seeds()
        bar = tqdm(prompts, desc="NeMo SSIM threshold", disable=not self.progress, leave=False)
        values = torch.cat([pairwise_ssims(self.diffs(prompt, seeds)) for prompt in bar])
        mean, std = values.double().mean().item(), values.double().std().item()
        return mean + self.settings.threshold_std * std, {"pairwise_ssim_mean": mean, "pairwise_ssim_std": std,
                                                          "calibration_prompts": len(prompts),
                                                          "guidance_scale": self.settings.guidance_scale}

    def all_seeds(self) -> list[int]:
        return list(range(self.settings.seed, self.settings.seed + self.settings.seeds))

    def locate_prompt(self, prompt: str, statistics: dict[str, tuple[torch.Tensor, torch.Tensor]],
                      threshold: float) -> dict:
        """NeMo for one memorized prompt: its refined neurons and what led to them."""
        from .nemo_ssim import ms_ssim

        seeds = self.all_seeds()
        with ValueRecorder(self.linears) as recorder:  # activations without guidance, as theirs
            first_step(self.pipe, [prompt], seeds[:1], self.settings.steps)
        activations = {name: rows[0] for name, rows in recorder.take().items()}
        vanilla = self.diffs(prompt, seeds)
        pairwise = max_pairwise_ssim(vanilla)
        memorized = pairwise > threshold
        result: dict[str, Any] = {
            "prompt": prompt, "max_pairwise_ssim": pairwise.max().item(), "memorized_seeds": int(memorized.sum()),
            "theta": None, "k": None, "broken": False, "initial": 0, "refined": 0, "similarity_initial": None,
            "similarity_refined": None, "neurons": {}}
        if not memorized.any():
            return result  # not memorized by NeMo's criterion: nothing to localise
        look = [seed for seed, keep in zip(seeds, memorized.tolist(), strict=True) if keep]
        reference = vanilla[memorized]

        def similarity(neurons: Neurons) -> float:
            return ms_ssim(reference, self.diffs(prompt, look, neurons)).max().item()

        z = {name: zscores(activations[name], *statistics[name], self.settings.two_sided) for name in self.linears}
        search = search_theta(z, activations, lambda neurons: similarity(neurons) <= threshold, self.settings)
        if not count(search.candidates) or (not search.broken and not self.settings.refine_unbroken):
            result.update(theta=search.theta, k=search.k, initial=count(search.candidates))
            return result
        initial_similarity = similarity(search.candidates)
        limit = threshold if search.broken else initial_similarity  # their fallback: refine against what θ_min reaches
        refined = refine(search.candidates, lambda neurons: similarity(neurons) <= limit)
        result.update(theta=search.theta, k=search.k, broken=search.broken, initial=count(search.candidates),
                      refined=count(refined), similarity_initial=initial_similarity,
                      similarity_refined=similarity(refined), neurons={k: v for k, v in refined.items() if v})
        return result



def edit(pipe, settings: NeMoSettings, memorized: list[str], reference: list[str], meta: dict | None = None,
         progress: bool = True) -> Masks:
    """The weight-edit entry point: NeMo's neurons for each memorized prompt, united into a neuron mask of `pipe`'s
    cross-attention value Linears. `reference` are non-memorized prompts (statistics and SSIM threshold)."""
    if not reference:
        raise MemPruneError("NeMo needs non-memorized prompts: give --reference FILE with non-memorized captions.")
    run = NeMoRun(pipe, settings, progress)
    statistics = run.reference_statistics(reference)
    calibration: dict[str, Any] = {}
    threshold = settings.ssim_threshold
    if threshold is None:
        threshold, calibration = run.calibrate_threshold(reference[: settings.calibration_prompts])
    results = []
    bar = tqdm(memorized, desc="NeMo memorized prompts", disable=not progress, leave=False)
    for prompt in bar:
        results.append(run.locate_prompt(prompt, statistics, threshold))
        bar.set_postfix(neurons=count(union([r["neurons"] for r in results])))
    neurons = union([result["neurons"] for result in results])
    shapes = {name: (linear.weight.shape[0], linear.weight.shape[1]) for name, linear in run.linears.items()}
    nemo_meta = {"ssim_threshold": threshold, **calibration, "criterion_calls": run.calls, "prompts": results,
                 "neurons": neurons}
    selection = {"method": "nemo", **asdict(settings)}
    return neuron_masks(neurons, shapes, settings.steps, {"selection": selection, **(meta or {}), "nemo": nemo_meta})


def tables(masks: Masks) -> dict:
    """nemo_prompts.csv for locate's folder: per memorized prompt θ, neuron counts and similarities."""
    import pandas as pd

    rows = [{key: value for key, value in result.items() if key != "neurons"}
            | {"neurons": ";".join(f"{layer}:{row}" for layer, rows in result["neurons"].items() for row in rows)}
            for result in masks.meta["nemo"]["prompts"]]
    return {"nemo_prompts.csv": pd.DataFrame(rows)}


def summary(masks: Masks, prompt_count: int, seconds: float, out) -> str:
    """What `memprune locate --method nemo` prints."""
    from pathlib import Path

    nemo = masks.meta["nemo"]
    neurons = count(nemo["neurons"])
    located = sum(1 for result in nemo["prompts"] if result["neurons"])
    detected = sum(1 for result in nemo["prompts"] if result["memorized_seeds"])
    broken = sum(1 for result in nemo["prompts"] if result["broken"])
    steps = masks.meta["selection"]["steps"]
    return (
        f"NeMo selected {neurons} value neurons in {sum(1 for v in nemo['neurons'].values() if v)} of "
        f"{len(masks.layers)} cross-attention layers from {prompt_count} memorized prompts ({detected} memorized by "
        f"the criterion, {broken} broken by deactivation, {located} with neurons; "
        f"SSIM threshold {nemo['ssim_threshold']:.3f}; {nemo['criterion_calls']} criterion calls, "
        f"{seconds:.0f} s).\n"
        f"Masks: {Path(out) / 'masks.safetensors'} (step-independent: prune with any --timesteps <= {steps})"
    )
