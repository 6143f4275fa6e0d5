"""Utility metrics of evaluate on real models: CLIP score (memprune.evaluation.clip_score) on every group, and FID
/ KID (memprune.evaluation.fid) of one generation per FID caption (group ``fid_prompts``) for every model column.

The FID captions (``fid_prompts``; default: the 10,000 COCO-2014 validation captions shipped in
data/prompts/coco2014_val_10000.csv, the first ``fid_count``) are generated once per model with the first seed of the
run; their images are turned into Inception features (and CLIP scores) batch by batch and not kept, so 10,000 images
at 512 px never sit in memory. Everything a metric needs (CLIP folder, Inception file, reference) is loaded before
any generation, so a wrong file is refused before hours of work.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..control import applied
from ..errors import MemPruneError
from ..generate import GenerationSettings, generate
from ..prompts import PromptList, read_prompts
from .clip_score import ClipScorer, load_clip_scorer
from .fid import FeatureExtractor, Reference, fid_kid, inception_extractor, load_reference

FID_GROUP = "fid_prompts"
SHIPPED_FID_PROMPTS = Path(__file__).resolve().parents[2] / "data" / "prompts" / "coco2014_val_10000.csv"


def check_utility_settings(settings) -> None:
    """Refuse FID options that cannot work, before anything is loaded (settings: an EvaluateSettings)."""
    if settings.fid_count is not None and settings.fid_count < 2:
        raise MemPruneError(f"--fid-count must be at least 2 (FID needs two images), got {settings.fid_count}.")
    fid_options = [name for name in ("fid_prompts", "fid_count", "inception") if getattr(settings, name) is not None]
    if settings.fid_reference is None and fid_options:
        raise MemPruneError(f"--{fid_options[0].replace('_', '-')} needs --fid-reference (reference images or "
                            "statistics to compare the generations with).")
    if settings.fid_reference is not None and settings.inception is None:
        raise MemPruneError("--fid-reference needs --inception FILE: the FID Inception TorchScript file "
                            "(memprune does not download it).")


@dataclass
class Utility:
    """What the utility metrics need, loaded: any of them may be None (metric not asked)."""

    clip: ClipScorer | None = None
    extractor: FeatureExtractor | None = None
    reference: Reference | None = None
    fid_prompts: PromptList | None = None


def fid_prompt_list(path: str | None, count: int | None) -> PromptList:
    """The FID captions: the given file or the shipped COCO captions, the first `count`."""
    if path is None:
        if not SHIPPED_FID_PROMPTS.is_file():
            raise MemPruneError(f"The shipped COCO captions ({SHIPPED_FID_PROMPTS}) are not installed here: give "
                                "--fid-prompts FILE.")
        path = str(SHIPPED_FID_PROMPTS)
    prompts = read_prompts(path)
    if count is not None:
        if count > len(prompts):
            raise MemPruneError(f"--fid-count {count} is more than the {len(prompts)} captions of '{path}'.")
        prompts = prompts.subset(list(range(count)))
    if len(prompts) < 2:
        raise MemPruneError(f"FID needs at least two captions; '{path}' holds {len(prompts)}.")
    return prompts


def prepare_utility(settings, device, log: Callable[[str], None], notes: list[str],
                    extractor: FeatureExtractor | None = None, clip: ClipScorer | None = None) -> Utility:
    """Load what the asked utility metrics need (settings: an EvaluateSettings); `extractor`/`clip` may be given."""
    utility = Utility(clip=clip)
    if utility.clip is None and settings.clip_model is not None:
        utility.clip = load_clip_scorer(settings.clip_model, device)
    if utility.clip is not None:
        log(utility.clip.description)
        notes.append(f"clip_score: {utility.clip.description}.")
    if settings.fid_reference is not None:
        utility.extractor = extractor or inception_extractor(settings.inception, device)
        utility.reference = load_reference(settings.fid_reference, utility.extractor)
        width = utility.extractor(torch.zeros(1, 3, 8, 8)).shape[1]
        if utility.reference.mu.shape[0] != width:
            raise MemPruneError(f"--fid-reference '{settings.fid_reference}' holds statistics of "
                                f"{utility.reference.mu.shape[0]} features, the Inception network gives {width}: "
                                "make them with the same network.")
        utility.fid_prompts = fid_prompt_list(settings.fid_prompts, settings.fid_count)
        has_features = utility.reference.features is not None
        kid = "FID and KID" if has_features else "FID (no KID: the statistics hold no features)"
        notes.append(f"{kid} of one generation per caption of '{utility.fid_prompts.source}' "
                     f"({len(utility.fid_prompts)} captions) against {utility.reference.description}.")
    return utility


def clip_score_rows(clip: ClipScorer, images: dict[tuple[str, str], torch.Tensor], sources: dict[str, PromptList],
                    groups: dict, models: list[str]) -> list[tuple[str, str, str, float]]:
    """clip_score of every model on every group: the mean over its generations (images are (P, S, 3, H, W))."""
    per_key = {}
    for (model, source), batch in images.items():
        captions = [caption for caption in sources[source].prompts for _ in range(batch.shape[1])]
        per_key[model, source] = clip.scores(batch.flatten(0, 1), captions).view(batch.shape[:2]).numpy()
    rows = []
    for model in models:
        for name, group in groups.items():
            values = np.stack([per_key[model, source][i] for source, i in group.members])
            rows.append((model, name, "clip_score", float(values.mean())))
    return rows


def generated_batches(pipe, prompts: list[str], generation: GenerationSettings, progress: bool, desc: str,
                      batch_size: int):
    """(prompt indices, images (B, 3, H, W) in [0, 1] on the CPU): one generation per prompt, in batches."""
    indices, images = [], []
    for index, _, image in generate(pipe, prompts, generation, output_type="pt", progress=progress, desc=desc):
        indices.append(index)
        images.append(image.detach().to("cpu", torch.float32).clamp(0, 1))
        if len(images) == batch_size:
            yield indices, torch.stack(images)
            indices, images = [], []
    if images:
        yield indices, torch.stack(images)


def fid_rows(utility: Utility, pipes: dict, generation: GenerationSettings, progress: bool,
             timings: dict[str, float] | None = None, batch_size: int = 64) -> list[tuple[str, str, str, float]]:
    """FID/KID (and clip_score) of every model on the FID captions, one generation each with the first seed."""
    prompts, extractor, reference = utility.fid_prompts, utility.extractor, utility.reference
    assert prompts is not None and extractor is not None and reference is not None, "prepare_utility loads them"
    one_seed = replace(generation, seeds=1)
    rows = []
    for model, model_or_edit in pipes.items():
        tic = time.perf_counter()
        features, clip_values = [], []
        with applied(model_or_edit) as pipe:  # a random control's weights are zeroed only while it generates
            for indices, images in generated_batches(pipe, prompts.prompts, one_seed, progress,
                                                     f"{model}: FID captions", batch_size):
                features.append(extractor(images).double().numpy())
                if utility.clip is not None:
                    clip_values.append(utility.clip.scores(images, [prompts.prompts[i] for i in indices]).numpy())
        count = float(len(prompts))
        rows += [(model, FID_GROUP, "n_prompts", count), (model, FID_GROUP, "n_generations", count)]
        values = fid_kid(np.concatenate(features), reference)
        rows += [(model, FID_GROUP, name, value) for name, value in values.items()]
        if clip_values:
            rows.append((model, FID_GROUP, "clip_score", float(np.concatenate(clip_values).mean())))
        if timings is not None:
            timings[f"fid_{model}"] = round(time.perf_counter() - tic, 3)  # generation and features of the captions
    return rows


def utility_rows(utility: Utility, pipes: dict, images: dict, sources: dict[str, PromptList], groups: dict,
                 generation: GenerationSettings, progress: bool,
                 timings: dict[str, float] | None = None) -> pd.DataFrame:
    """Every utility metric row (model, group, metric, value); empty when none was asked."""
    rows = []
    if utility.clip is not None:
        rows += clip_score_rows(utility.clip, images, sources, groups, list(pipes))
    if utility.reference is not None:
        rows += fid_rows(utility, pipes, generation, progress, timings)
    return pd.DataFrame(rows, columns=["model", "group", "metric", "value"])
