"""`memprune locate`: record memorized and reference prompts, select with Wanda, compare seeded subsets."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .checkpoint import PartialStats, prompts_key
from .conditioning import Conditioning, pipeline_kwargs, rows_of
from .distributed import Processes, reduce_stats
from .errors import MemPruneError
from .generate import GenerationSettings, call_plan, generate, guidance_scale, pipeline_call_kwargs, uses_cfg
from .masks import Masks, subset_overlap
from .methods.wanda import SelectionSettings, select
from .models import denoiser, layer_shapes, model_identity, output_linears
from .prompts import PromptList, empty_prompts, read_prompts, seeded_subsets, write_prompts
from .record import HALVES, ActivationRecorder, Half, check_half
from .stats import NeuronStats


@dataclass
class LocateSettings:
    model: str
    memorized: str
    reference: str = "empty"  # "empty" or a prompt file of non-memorized captions
    memorized_label: str | None = None  # keep only memorized prompts with this label (e.g. "VM")
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    selection: SelectionSettings = field(default_factory=SelectionSettings)
    half: Half = "both"
    num_prompts: int | None = None  # locate on a seeded sample of this many memorized prompts
    sample_seed: int = 0
    subsets: int = 0  # N seeded subsets for the overlap analysis (0: none)
    subset_size: int = 10
    control: str | None = None  # non-memorized prompts for the overlap controls

    def __post_init__(self):
        if self.half not in HALVES:
            raise MemPruneError(f"Unknown --half '{self.half}': use one of {', '.join(HALVES)}.")
        if self.generation.steps < 1 or self.generation.seeds < 1:
            raise MemPruneError("--steps and --seeds must be at least 1.")
        if self.subsets == 1:
            raise MemPruneError("--subsets needs at least 2 subsets to compare (or 0 for none).")


@dataclass
class LocateResult:
    masks: Masks
    memorized_stats: NeuronStats
    reference_stats: NeuronStats
    prompts: PromptList
    overlap: pd.DataFrame | None = None
    subset_masks: dict[str, list[Masks]] = field(default_factory=dict)


def record_prompts(pipe, prompts: list[str], generation: GenerationSettings, half: Half = "both",
                   desc: str = "recording", progress: bool = True, processes: Processes | None = None,
                   partial: PartialStats | None = None) -> NeuronStats:
    """Generate every prompt with hooks on; return the statistics (latents are discarded, no VAE decode).

    Each pipeline call's float32 statistics are merged into float64 host totals in call order, so the result does
    not depend on how the calls are split: over `processes` (each runs its shard, the totals are merged in rank
    order) or over an interruption (`partial` holds the totals so far and the run goes on from there)."""
    processes = processes or Processes()
    cfg = uses_cfg(pipe, generation)
    check_half(pipe, half, cfg)
    calls = processes.shard(call_plan(prompts, generation))
    key = prompts_key(prompts)
    total, done = partial.load(key, len(calls)) if partial is not None else (NeuronStats(), 0)
    recorder = ActivationRecorder(denoiser(pipe), half=half, cfg=cfg)

    def before_call():
        if processes.faults is not None:  # always set by Processes.__post_init__
            processes.faults.before_call()
        recorder.new_generation()

    def after_call(call):
        nonlocal done
        total.merge(recorder.take_stats().to("cpu"))
        done += 1
        if partial is not None:
            partial.save(key, total, done, len(calls))

    with recorder:
        for _ in generate(pipe, prompts, generation, output_type="latent", before_call=before_call, calls=calls[done:],
                          after_call=after_call, progress=progress and processes.is_main, desc=desc):
            pass
    total.check_finite()
    total = reduce_stats(processes, total)
    total.meta.update({"prompts": len(prompts), "half": half, "steps": generation.steps, "seeds": generation.seeds})
    return total


def one_prompt(conditioning: Conditioning, index: int) -> Conditioning:
    """Row `index` of a conditioning (its prompt and, with CFG, the negative prompt's row)."""
    rows, n = torch.tensor([index]), len(conditioning)
    uncond = None if conditioning.uncond_kwargs is None else rows_of(conditioning.uncond_kwargs, rows, n)
    return Conditioning(rows_of(conditioning.kwargs, rows, n), uncond, [conditioning.prompts[index]])


def record_embeddings(pipe, conditioning: Conditioning, embeddings: list[torch.Tensor],
                      generation: GenerationSettings, half: Half = "both", progress: bool = True,
                      desc: str = "recording embeddings") -> NeuronStats:
    """record_prompts for prompt *embeddings* instead of text: generate from each (1, T, D) token embedding in
    `embeddings` (row i replaces prompt i of `conditioning`, e.g. an attack's e + δ; the negative prompt and the
    other conditioning entries stay as encoded) with `generation`'s seeds, hooks on, latents discarded."""
    cfg = uses_cfg(pipe, generation)
    check_half(pipe, half, cfg)
    seeds = list(range(generation.seed, generation.seed + generation.seeds))
    total = NeuronStats()
    recorder = ActivationRecorder(denoiser(pipe), half=half, cfg=cfg)
    with recorder, torch.inference_mode():
        for i, cond in enumerate(tqdm(embeddings, desc=desc, disable=not progress, leave=False)):
            one = one_prompt(conditioning, i)
            batch = one.repeated(len(seeds), cond.to(one.cond))
            recorder.new_generation()
            pipe(num_inference_steps=generation.steps, guidance_scale=guidance_scale(pipe, generation),
                 generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds], output_type="latent",
                 **pipeline_kwargs(batch), **pipeline_call_kwargs(pipe, generation))
            total.merge(recorder.take_stats().to("cpu"))
    total.check_finite()
    total.meta.update({"prompts": len(embeddings), "half": half, "steps": generation.steps,
                       "seeds": generation.seeds, "embeddings": True})
    return total


def reference_prompts(reference: str, count: int, seed: int) -> list[str]:
    """The reference set, as many prompts as the memorized set so the summed statistics are comparable:
    the empty prompt repeated, or a seeded sample of a non-memorized file (cycled if it is shorter)."""
    if reference == "empty":
        return empty_prompts(count).prompts
    captions = read_prompts(reference).prompts
    order = np.random.default_rng(seed).permutation(len(captions))
    return [captions[order[i % len(captions)]] for i in range(count)]


class Locator:
    """Records and selects with one pipeline and one set of settings.

    Statistics are cached by prompt list, so selecting again with other settings (ratio, granularity) — as
    sweeps and notebooks do — costs no generation; reference statistics are cached by size.
    """

    def __init__(self, pipe, settings: LocateSettings, progress: bool = True, processes: Processes | None = None,
                 partial: PartialStats | None = None):
        self.pipe = pipe
        self.settings = settings
        self.progress = progress
        self.processes = processes  # shard the recording over these processes (None: this one only)
        self.partial = partial  # save running totals here so a killed run resumes (None: keep nothing)
        self.weights = {name: linear.weight for name, linear in output_linears(denoiser(pipe)).items()}
        self._stats_cache: dict[tuple[str, ...], NeuronStats] = {}
        self._reference_cache: dict[int, NeuronStats] = {}

    def stats(self, prompts: list[str], desc: str = "recording") -> NeuronStats:
        key = tuple(prompts)
        if key not in self._stats_cache:
            self._stats_cache[key] = record_prompts(self.pipe, prompts, self.settings.generation, self.settings.half,
                                                    desc=desc, progress=self.progress, processes=self.processes,
                                                    partial=self.partial)
        return self._stats_cache[key]

    def reference_stats(self, count: int) -> NeuronStats:
        if count not in self._reference_cache:
            prompts = reference_prompts(self.settings.reference, count, self.settings.sample_seed)
            self._reference_cache[count] = record_prompts(
                self.pipe, prompts, self.settings.generation, self.settings.half, desc=f"reference ({count})",
                progress=self.progress, processes=self.processes, partial=self.partial)
        return self._reference_cache[count]

    def masks(self, prompts: list[str], selection: SelectionSettings | None = None, meta: dict | None = None,
              desc: str = "recording") -> Masks:
        memorized = self.stats(prompts, desc)
        reference = self.reference_stats(len(prompts))
        return select(self.weights, memorized, reference, selection or self.settings.selection, meta=meta)


def denoiser_calls(pipe, calls: int, steps: int) -> dict:
    """What a mask step is: the index of a denoiser call within one generation, not of a sampling step. Most
    schedulers call the denoiser once per step; PNDM (SD 1.5's default) calls it steps + 1 times (its first step
    twice), Heun-type schedulers about twice per step. `memprune prune --timesteps` counts these calls too."""
    scheduler = type(getattr(pipe, "scheduler", None)).__name__
    return {"per_generation": calls, "steps": steps, "scheduler": scheduler,
            "text": f"{calls} denoiser calls for --steps {steps} with {scheduler}"}


def memorized_prompts(settings: LocateSettings) -> PromptList:
    """The memorized prompts locate records: all of the file, or a seeded sample of --num-prompts."""
    memorized = read_prompts(settings.memorized, label=settings.memorized_label)
    if settings.num_prompts is not None:
        memorized = memorized.subset(seeded_subsets(len(memorized), 1, settings.num_prompts, settings.sample_seed)[0])
    return memorized


def locate(settings: LocateSettings, pipe, processes: Processes | None = None,
           partial: PartialStats | None = None) -> LocateResult:
    """Masks of the memorized prompts (all, or a seeded sample), plus subset overlap with controls if asked.

    With `processes` every process runs its share of the generations and all get the same result; with `partial`
    the running statistics are saved (and resumed from) there."""
    memorized = memorized_prompts(settings)
    check_half(pipe, settings.half, uses_cfg(pipe, settings.generation))  # before any generation
    net = denoiser(pipe)
    meta: dict[str, Any] = {
        "model": model_identity(settings.model, pipe),
        "settings": {"half": settings.half, "reference": settings.reference, "generation": vars(settings.generation)},
        "prompts": memorized.prompts,
    }
    meta["model"]["layer_shapes"] = layer_shapes(net)
    locator = Locator(pipe, settings, processes=processes, partial=partial)
    masks = locator.masks(memorized.prompts, meta=meta, desc="memorized")
    masks.meta["denoiser_calls"] = denoiser_calls(pipe, len(masks.steps), settings.generation.steps)
    result = LocateResult(masks, locator.stats(memorized.prompts), locator.reference_stats(len(memorized)), memorized)
    if settings.subsets:
        result.subset_masks = subset_masks(locator, settings)
        result.overlap = subset_overlap(result.subset_masks)
    return result


def subset_masks(locator: Locator, settings: LocateSettings, selection: SelectionSettings | None = None
                 ) -> dict[str, list[Masks]]:
    """Masks of N seeded memorized subsets and N non-memorized (control) subsets of the same size."""
    if settings.control is None:
        raise MemPruneError("--subsets needs non-memorized prompts for the controls: give --control FILE.")
    groups = {"memorized": read_prompts(settings.memorized, label=settings.memorized_label),
              "non_memorized": read_prompts(settings.control)}
    result = {}
    for offset, (name, prompts) in enumerate(groups.items()):
        draws = seeded_subsets(len(prompts), settings.subsets, settings.subset_size, settings.sample_seed + 1 + offset)
        result[name] = [
            locator.masks(prompts.subset(draw).prompts, selection, {"subset": draw},
                          f"{name} subset {i + 1}/{len(draws)}")
            for i, draw in enumerate(draws)
        ]
    return result


def save_locate_result(result: LocateResult, folder: str | Path) -> None:
    folder = Path(folder)
    result.masks.save(folder)
    (folder / "stats").mkdir(exist_ok=True)
    result.memorized_stats.save(folder / "stats" / "memorized.safetensors")
    result.reference_stats.save(folder / "stats" / "reference.safetensors")
    write_prompts(result.prompts.prompts, folder / "prompts_used.csv")
    if result.overlap is not None:
        result.overlap.to_csv(folder / "overlap.csv", index=False)
