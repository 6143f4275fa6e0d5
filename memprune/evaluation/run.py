"""Evaluate as a library call: generate every prompt file with every model on the same seeds, then score.

Models: ``unedited`` and each edited model (``edited`` for a lone one, else named by folder); beside each edited
model (unless ``random_control=False``) the unedited model with as many weights zeroed at random per tensor as the
edit zeroes (memprune.control; seed ``random_control_seed``), named by ``schema.random_control_name``: the edit is
evidence only where it beats it; with ``mitigation``, the unedited model wrapped by it (memprune.evaluation.mitigation).
Every model is timed in the same run with the same settings: generation alternates the models per prompt file, after
one warm-up call each. The metrics are memprune.evaluation.scoring's.

Over several processes (``processes``, memprune.work_split) every process generates its round-robin share of the
pipeline calls of every prompt file with every model (a generation-time mitigation runs whole on the main process,
its per-image records in order); the main process gathers the images and detection scores, puts them back in call
order and alone scores them; a model's generation seconds are the sum over the processes.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import pandas as pd
import torch

from ..control import applied, random_control_edit_of
from ..detect import generate_with_scores, summarize_steps
from ..distributed import Processes
from ..generate import Call, GenerationSettings, call_plan, generate, uses_cfg
from ..models import load_pipeline, resolve_device
from ..prompts import PromptList
from ..similarity import make_backend
from ..work_split import gather_in_order, share
from .classifier import AttributeClassifier, load_testbed_classifier
from .fixed_thresholds import sscd_gen_note
from .inputs import Group, build_groups, check_edited, read_sources
from .mitigation import add_mitigation_metrics, mitigation_pipes
from .schema import random_control_name, sort_metrics
from .scoring import Generated, score
from .settings import EvaluateSettings
from .sharing import load_sharing
from .utility import prepare_utility, utility_rows


@dataclass
class EvaluationResult:
    metrics: pd.DataFrame  # tidy: model, group, metric, value
    generations: pd.DataFrame  # one row per model, source, prompt and seed
    threshold: float
    threshold_info: dict
    backend: str  # the similarity backend's description
    images: dict[tuple[str, str], torch.Tensor]  # (model, source) -> (prompts, seeds, 3, H, W) in [0, 1]
    sources: dict[str, PromptList]
    groups: dict[str, Group]
    training_images: dict[str, list[torch.Tensor | None]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    random_controls: dict[str, dict] = field(default_factory=dict)  # control name -> of, seed, zeroed weights

    def value(self, model: str, group: str, metric: str) -> float:
        metrics = self.metrics
        rows = metrics[(metrics.model == model) & (metrics.group == group) & (metrics.metric == metric)]
        if rows.empty:
            raise KeyError((model, group, metric))
        return float(rows.value.iloc[0])


def evaluate(settings: EvaluateSettings, pipe=None, edited_pipe=None,
             attribute_classifier: AttributeClassifier | Literal["testbed"] | None = None, device: str = "auto",
             dtype=None, progress: bool = True, log: Callable[[str], None] | None = None,
             processes: Processes | None = None) -> EvaluationResult | None:
    """Generate every prompt file with every model (same seeds) and compute the metrics (see the module docstring).

    `settings` name every prompt file (memprune.commands.evaluate fills a testbed's defaults). `pipe`/`edited_pipe`
    may be given loaded; otherwise they are loaded from settings.model / settings.edited. `attribute_classifier`:
    None, a callable, or "testbed": the testbed's classifier of settings.model, loaded when there are general captions.
    With `processes` this process generates its share; the main process returns the result, the others None.
    """
    processes = processes or Processes()
    main = processes.is_main
    log = log if log is not None and main else (lambda message: None)
    settings.check_prompt_files()
    notes = [check_edited(settings.model, folder) for folder in settings.edited_models().values()]
    backend = make_backend(settings.similarity, settings.sscd)
    log(f"Similarity backend: {backend.description}")
    sources, roles = read_sources(settings)
    groups, group_notes = build_groups(settings, sources, roles)
    notes += group_notes
    classifier = _classifier(attribute_classifier, settings, groups, notes, log) if main else None
    notes += [note for note in [sscd_gen_note(sources[roles["memorized"]])] if note]
    utility = prepare_utility(settings, resolve_device(device), log, notes) if main else None

    timings: dict[str, float] = {}
    start = time.perf_counter()
    pipes = load_pipes(settings, pipe, edited_pipe, device, dtype)
    random_controls = add_random_controls(pipes, settings, notes) if settings.random_control else {}
    timings["load"] = round(time.perf_counter() - start, 3)
    cfg = uses_cfg(pipes["unedited"], settings.generation)
    if not cfg:
        notes.append("No classifier-free guidance (guidance scale <= 1): detection metrics are skipped.")

    mitigated: dict[str, object] = {}
    if settings.mitigation is not None and main:  # the main process alone generates with it
        tic = time.perf_counter()
        mitigated = mitigation_pipes(settings, pipes["unedited"], sources, groups, notes, log)
        pipes.update(mitigated)
        timings["mitigation_calibration"] = round(time.perf_counter() - tic, 3)

    first_prompt = sources[roles["memorized"]].prompts[0]
    generated, records = _generate_all(pipes, mitigated, sources, first_prompt, settings.generation,
                                       progress and main, timings, processes)
    if not main or utility is None:  # another process: its share is with the main process, which scores
        return None

    tic = time.perf_counter()
    scores = score(settings, backend, sources, groups, list(pipes), generated, cfg, classifier)
    metrics = scores.metrics
    extra = utility_rows(utility, pipes, generated.images, sources, groups, settings.generation, progress, timings)
    if not extra.empty:
        metrics = sort_metrics(pd.concat([metrics, extra], ignore_index=True), list(pipes))
    timings["metrics"] = round(time.perf_counter() - tic, 3)
    if mitigated:
        metrics = add_mitigation_metrics(metrics, settings.generation.seeds, mitigated, records, groups, list(pipes))
    return EvaluationResult(metrics=metrics, generations=scores.generations, threshold=scores.threshold.value,
                            threshold_info=scores.threshold.info, backend=backend.description, images=generated.images,
                            sources=sources, groups=groups, training_images=scores.training_images, timings=timings,
                            notes=notes, random_controls=random_controls)


def _classifier(given, settings: EvaluateSettings, groups: dict[str, Group], notes: list[str],
                log: Callable[[str], None]) -> AttributeClassifier | None:
    if isinstance(given, str):
        if given != "testbed":
            raise ValueError(f"attribute_classifier must be None, a callable or 'testbed', got {given!r}.")
        wanted = settings.attributes and "general" in groups
        given = load_testbed_classifier(settings.model, log) if wanted else None
        if wanted and given is None:
            notes.append("No testbed attribute classifier is importable: attribute_accuracy is skipped.")
    return given


def load_pipes(settings: EvaluateSettings, pipe, edited_pipe, device: str, dtype) -> dict[str, object]:
    """{"unedited": ..., <edited name>: ...}: the given pipelines, the others loaded onto the device; a loaded edited
    pipeline shares every component whose files equal the base model's (memprune.evaluation.sharing)."""
    target = resolve_device(device)
    loaded_here = pipe is None  # a given pipeline may differ from settings.model's files: share nothing of it
    if pipe is None:
        pipe = load_pipeline(settings.model, target, dtype)
    pipes = {"unedited": pipe}
    for index, (name, folder) in enumerate(settings.edited_models().items()):
        given = edited_pipe if index == 0 and settings.edited is not None else None
        if given is None:
            given = (load_sharing(pipe, settings.model, folder, target, dtype) if loaded_here
                     else load_pipeline(folder, target, dtype))
        pipes[name] = given
    if edited_pipe is not None and len(pipes) == 1:
        pipes["edited"] = edited_pipe
    return pipes


def add_random_controls(pipes: dict, settings: EvaluateSettings, notes: list[str]) -> dict[str, dict]:
    """Beside each edited model, the unedited model with as many random weights zeroed per tensor (memprune.control):
    a ZeroedWeights of the unedited pipeline, applied only while the control generates (no copy is held)."""
    controls = {}
    for name, edited_pipe in list(pipes.items())[1:]:
        control, counts = random_control_edit_of(pipes["unedited"], edited_pipe, settings.random_control_seed)
        if control is None:
            notes.append(f"'{name}' zeroes no weight of the base model: no random control beside it.")
            continue
        control_name = random_control_name(name)
        pipes[control_name] = control
        controls[control_name] = {"of": name, "seed": settings.random_control_seed,
                                  "zeroed_weights": sum(counts.values()), "tensors": len(counts)}
        notes.append(f"'{control_name}': the unedited model with {sum(counts.values())} random weights zeroed, as many "
                     f"per tensor as '{name}' zeroes ({len(counts)} tensors, seed {settings.random_control_seed}).")
    return controls


def _generate_all(pipes: dict, mitigated: dict, sources: dict[str, PromptList], warm_up_prompt: str,
                  generation: GenerationSettings, progress: bool, timings: dict[str, float],
                  processes: Processes) -> tuple[Generated, dict[tuple[str, str], list]]:
    """Every prompt file with every model, the models alternating per file (load drift hits all alike); the
    mitigation's per-image records by (model, source). Over several processes each generates its share of every
    file's pipeline calls (module docstring) and the main process gets the whole (the others: an empty Generated)."""
    for model in pipes.values():
        with applied(model) as model_pipe:
            _warm_up(model_pipe, warm_up_prompt, generation)
    for model_pipe in mitigated.values():
        model_pipe.records.clear()  # the warm-up's records are not part of the evaluation
    plans = {source: call_plan(prompts.prompts, generation) for source, prompts in sources.items()}
    work = [(source, index) for source, plan in plans.items() for index in range(len(plan))]
    mine = {work[place] for place in share(len(work), processes)}
    local: dict[tuple[str, str], tuple[dict, float]] = {}
    records: dict[tuple[str, str], list] = {}
    for source, prompts in sources.items():
        for model, model_or_edit in pipes.items():
            if model in mitigated:
                model_or_edit.records.clear()
            calls = plans[source] if model in mitigated else [
                call for index, call in enumerate(plans[source]) if (source, index) in mine]
            tic = time.perf_counter()
            with applied(model_or_edit) as model_pipe:
                parts = generate_parts(model_pipe, prompts.prompts, generation, f"{model}: {source}", progress, calls,
                                       processes.faults.before_call if processes.faults is not None else None)
            local[model, source] = (parts, time.perf_counter() - tic)
            if model in mitigated:
                records[model, source] = list(model_or_edit.records)
    generated = Generated({}, {}, {}, {})
    gathered = gather_in_order(processes, {(processes.rank, key): value for key, value in local.items()})
    if gathered is None:
        return generated, records
    for source, prompts in sources.items():
        for model in pipes:
            key = (model, source)
            shares = [value for (_, name), value in gathered.items() if name == key]
            parts = {place: part for rank_parts, _ in shares for place, part in rank_parts.items()}
            images, mean, first = assemble(parts, len(prompts), generation.seeds)
            generated.images[key], generated.detection_mean[key], generated.detection_first[key] = images, mean, first
            generated.seconds[key] = sum(seconds for _, seconds in shares)
            timings[f"generate_{model}_{source}"] = round(generated.seconds[key], 3)
    return generated, records


Part = tuple[torch.Tensor, float, float]  # one generation: image (3, H, W) in [0, 1], Wen score mean and first step


def generate_parts(pipe, prompts: list[str], generation: GenerationSettings, desc: str, progress: bool,
                   calls: list[Call] | None = None, before_call=None) -> dict[tuple[int, int], Part]:
    """The generations of `calls` (default: all), by (prompt index, seed - first seed)."""
    parts = {}
    for index, seed, image, per_step in generate_with_scores(pipe, prompts, generation, "pt", progress, desc, calls,
                                                             before_call):
        mean, first = summarize_steps(per_step) if per_step is not None else (np.nan, np.nan)
        parts[index, seed - generation.seed] = (image.detach().to("cpu", torch.float32).clamp(0, 1), mean, first)
    return parts


def assemble(parts: dict[tuple[int, int], Part], n: int, seeds: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Images (P, S, 3, H, W), per-generation Wen scores (P, S) mean and first step (NaN without CFG)."""
    images = torch.stack([torch.stack([parts[i, s][0] for s in range(seeds)]) for i in range(n)])
    mean = np.array([[parts[i, s][1] for s in range(seeds)] for i in range(n)], dtype=float).reshape(n, seeds)
    first = np.array([[parts[i, s][2] for s in range(seeds)] for i in range(n)], dtype=float).reshape(n, seeds)
    return images, mean, first


def generate_images(pipe, prompts: list[str], generation: GenerationSettings, desc: str,
                    progress: bool) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Images (P, S, 3, H, W), per-generation Wen scores (P, S) mean and first step (NaN without CFG)."""
    return assemble(generate_parts(pipe, prompts, generation, desc, progress), len(prompts), generation.seeds)


def _warm_up(pipe, prompt: str, generation: GenerationSettings) -> None:
    """One short call so that the first timed group does not pay for lazy initialisation."""
    warm = replace(generation, steps=min(2, generation.steps), seeds=1, batch_size=1)
    for _ in generate(pipe, [prompt], warm, output_type="latent", progress=False):
        pass
