"""The attack's unit of work, a job: one prompt of one group attacked on one model and generated from (baseline,
attacked and at every budget checkpoint) on the fresh seeds, scored against its own target image.

A job is seeded by the attack's and the generation's seeds, never by the process that runs it, and its similarities
do not depend on the threshold: `run_job` may run in any process (memprune.work_split), and `job_rows` turns the
gathered results into the rows of memprune.attack.run, in job order, on the main process.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..conditioning import encode
from ..evaluation.metrics import memorization_rate
from ..prompts import PromptList
from .embedding import attack_prompt, generate_from_embeddings
from .groups import other_prompt_for


@dataclass
class AttackGroup:
    """A group of prompts attacked on every model: its name (the metrics' group) and prompts with target images."""
    name: str
    prompts: PromptList
    images: list[torch.Tensor]  # the target images at the pipeline's size
    features: torch.Tensor  # their similarity features


@dataclass
class JobResult:
    """One job's outcome: its per-prompt fields (no model, no threshold) and its similarities per seed."""
    row: dict
    similarity: dict[bool, np.ndarray]  # unattacked (False) and attacked (True)
    budget: dict[int, np.ndarray] = field(default_factory=dict)  # attack steps -> similarity at that checkpoint


def jobs_of(groups: list[AttackGroup]) -> list[tuple[AttackGroup, int]]:
    """Every (group, prompt index) of the attack, in the fixed order every model is attacked in."""
    return [(group, i) for group in groups for i in range(len(group.prompts))]


def score(backend, images: torch.Tensor, target_features: torch.Tensor) -> np.ndarray:
    feats = backend.features(images)
    return backend.paired(feats, target_features[None].expand_as(feats)).double().numpy()


def run_job(pipe, group: AttackGroup, i: int, backend, settings, size, others: list[str] | None = None) -> JobResult:
    """Attack prompt `i` of `group` on `pipe` (settings: an AttackRunSettings) and score its generations."""
    prompt = group.prompts.prompts[i]
    with torch.no_grad():
        conditioning = encode(pipe, [prompt], None, size)
    other = other_prompt_for(prompt, others) if settings.attack.init == "other" and others else None
    result = attack_prompt(pipe, prompt, group.images[i], settings.attack, conditioning, other)
    row = {"group": group.name, "prompt_index": i, "caption": prompt, "image": group.prompts.image(i),
           "denoising_loss": result.loss_before, "denoising_loss_attacked": result.loss_after,
           "perturbation_norm_relative": result.relative_norm, "attack_seconds": result.seconds}

    def similarity(cond: torch.Tensor) -> np.ndarray:
        images = generate_from_embeddings(pipe, conditioning, cond, settings.generation, size)
        return score(backend, images, group.features[i])

    similarities = {False: similarity(conditioning.cond),
                    True: similarity(conditioning.cond + result.delta.to(conditioning.cond))}
    budget = {}
    for step, delta in sorted(result.checkpoints.items()):
        if step == settings.attack.attack_steps:  # the attacked embedding itself
            budget[step] = similarities[True]
        elif step == 0 and settings.attack.init == "prompt":  # the prompt's own embedding
            budget[step] = similarities[False]
        else:
            budget[step] = similarity(conditioning.cond + delta.to(conditioning.cond))
    return JobResult(row, similarities, budget)


def job_rows(name: str, job: JobResult, threshold: float, settings) -> tuple[dict, list[dict], list[dict]]:
    """One job's per-prompt row, per-generation rows (baseline and attacked) and attack-budget rows on model `name`."""
    seeds = list(range(settings.generation.seed, settings.generation.seed + settings.generation.seeds))
    row = {"model": name, **job.row}
    group, i, caption = row["group"], row["prompt_index"], row["caption"]
    for attacked, suffix in ((False, ""), (True, "_attacked")):
        row[f"copy_similarity{suffix}"] = float(job.similarity[attacked].mean())
        row[f"memorization_rate{suffix}"] = memorization_rate(job.similarity[attacked], threshold)
    order = ["model", "group", "prompt_index", "caption", "image", "denoising_loss", "denoising_loss_attacked",
             "perturbation_norm_relative", "attack_seconds", "copy_similarity", "memorization_rate",
             "copy_similarity_attacked", "memorization_rate_attacked"]
    row = {key: row[key] for key in order}
    generations = [{"model": name, "group": group, "prompt_index": i, "caption": caption, "seed": seed,
                    "attacked": attacked, "copy_similarity": float(value), "is_copy": bool(value > threshold)}
                   for attacked in (False, True) for seed, value in zip(seeds, job.similarity[attacked], strict=True)]
    budget = [{"model": name, "group": group, "prompt_index": i, "seed": seed, "attack_steps": step,
               "copy_similarity": float(value)}
              for step, values in sorted(job.budget.items()) for seed, value in zip(seeds, values, strict=True)]
    return row, generations, budget


def attack_groups(name: str, pipe, groups: list[AttackGroup], backend, threshold: float, settings, size,
                  progress: bool, others: list[str] | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """Attack every prompt of every group on one model: its per-prompt rows, its per-generation rows (baseline and
    attacked) and its attack-budget rows (per generation and checkpoint)."""
    per_prompt, generations, budget = [], [], []
    for group, i in tqdm(jobs_of(groups), desc=f"attack {name}", disable=not progress, leave=False):
        row, gens, curve = job_rows(name, run_job(pipe, group, i, backend, settings, size, others), threshold,
                                    settings)
        per_prompt.append(row)
        generations += gens
        budget += curve
    return per_prompt, generations, budget
