"""The attack over models: every memorized prompt, and its false-positive controls, attacked on the unedited model
and on every edited model, the attacked and baseline generations scored as evaluate scores copies.

For every memorized prompt with a known training image (minus ``exclude_prompts``, the first ``num_prompts``) and
every caption of the control groups (memprune.attack.groups: same-style images seen once, images never seen), on
each model, memprune.attack.embedding optimises the embedding (``init`` other: from the first control caption that
is not the attacked prompt, or ``init_prompt``; the run's notes name it); generations from the attacked embedding
and from the prompt's e use FRESH seeds (``seed`` .. ``seed + seeds − 1``, default from 1000, never the attack's
seed; ``seeds`` 2, ``steps`` 50); the copy similarity of every generation to its own target image comes from
evaluate's similarity backend, and a copy is counted when it is strictly above the copy threshold (evaluate's
``memorization_rate``). Calibrated on the same-style control (below), the threshold puts that group's unattacked
rate near 100 − percentile by construction (against the nearest training image; here against its own image).

Copy threshold — the same as evaluate's, by one of (first that applies): ``threshold`` (a number, e.g. from an
evaluate run's metrics.csv); ``threshold_from`` (an evaluate output folder: its ``copy_threshold`` row, refused when
its similarity backend differs); otherwise calibrated in this run exactly as evaluate calibrates it (the
``threshold_percentile``, 95, of the similarity of the unedited model's generations of the non-memorized ``control``
prompts — testbed default: its same-style captions — to their nearest known training image of the memorized and
control files), with this run's fresh seeds and steps.

Models are named as evaluate names them (so rows join in memprune.compare): ``unedited``; one ``--edited`` folder is
``edited``; several are named by folder (memprune.evaluation.settings.edited_model_names). An edited model whose
tokenizer or text encoder differ from the base model's is refused (memprune.attack.text_side).

Metrics (tidy model, group, metric, value; group ``memorized_held_out`` with ``exclude_prompts``, else
``memorized``, and one group per control group): memorization_rate, copy_similarity (baseline, same fresh seeds),
memorization_rate_attacked, copy_similarity_attacked, denoising_loss(_attacked) (the objective on the attack's
draws, before and after), perturbation_norm_relative, attack_seconds_per_prompt, n_prompts, n_generations, and
copy_threshold (unedited); with ``fixed_thresholds``, memorization_rate@<t> and memorization_rate_attacked@<t> at each
fixed threshold t.
The attack-budget curve (memprune.attack.budget) scores generations from the embedding kept at ``budget_steps``.

Over several processes (``processes``, memprune.work_split) each attacks its round-robin share of the (group, prompt)
jobs on every model (memprune.attack.jobs); the main process calibrates the threshold, gathers the jobs' similarities
and alone makes the rows, in job order; a model's attack seconds are the sum over the processes.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..cli_types import require_finite
from ..conditioning import asked_size
from ..distributed import Processes
from ..errors import MemPruneError
from ..evaluation.fixed_thresholds import backend_name, check_fixed_thresholds, fixed_rates
from ..evaluation.inputs import check_edited
from ..evaluation.metrics import calibrate_threshold, memorization_rate
from ..evaluation.settings import edited_model_names
from ..generate import GenerationSettings, generate, uses_cfg
from ..models import DEFAULT_MODEL, load_pipeline, resolve_device
from ..prompts import PromptList, read_prompts, require_available
from ..readback import read_metrics_csv, read_run_settings
from ..similarity import load_image, make_backend
from ..work_split import gather_in_order, share
from .budget import BUDGET_STEPS, budget_checkpoints, budget_curve
from .embedding import AttackSettings
from .groups import CONTROL_GROUP, control_groups, other_prompts
from .jobs import AttackGroup, job_rows, jobs_of, run_job
from .text_side import check_same_text_side, text_fingerprint, text_side

GENERATION_SEED = 1000  # first fresh generation seed: far from the attack's seed and from evaluate's 0..seeds-1
NO_THRESHOLD = ("Give --threshold, --threshold-from (an evaluate folder) or --control (non-memorized prompts with "
                "training images) to set the copy threshold.")

@dataclass
class AttackRunSettings:
    model: str = DEFAULT_MODEL
    edited: tuple[str, ...] = ()
    prompts: str | None = None  # memorized prompts with an image column (testbed default: its memorized.csv)
    exclude_prompts: str | None = None  # locate's prompts_used.csv: attack only the held-out prompts
    num_prompts: int | None = None  # the first N (file order) of the attacked prompts
    control: str | None = None  # non-memorized prompts that calibrate the threshold (testbed: same-style captions)
    threshold: float | None = None
    threshold_from: str | None = None  # an evaluate output folder
    threshold_percentile: float = 95.0
    similarity: str = "ssim"
    sscd: str | None = None
    fixed_thresholds: tuple[float, ...] = ()  # memorization_rate(_attacked)@<t> beside the calibrated rates
    generation: GenerationSettings = field(default_factory=lambda: GenerationSettings(steps=50, seeds=2,
                                                                                       seed=GENERATION_SEED))
    attack: AttackSettings = field(default_factory=AttackSettings)
    controls: str | None = None  # same-style images seen once (caption, image); "none": no such group
    unseen: str | None = None  # images never seen in training (caption, image); "none": no such group
    num_controls: int | None = None  # rows per control group (default: as many as memorized prompts attacked)
    init_prompt: str | None = None  # the start of --init other (default: the first control caption)
    budget_steps: tuple[int, ...] = BUDGET_STEPS  # the attack-budget curve's steps (up to --attack-steps)

    def __post_init__(self):
        self.model = self.model or DEFAULT_MODEL
        if self.attack.attack_steps < 1:
            raise MemPruneError("--attack-steps must be at least 1: 0 steps is the unattacked baseline, which every "
                                "attack run reports beside the attacked rate.")
        if self.num_controls is not None and self.num_controls < 1:
            raise MemPruneError(f"--num-controls must be at least 1, got {self.num_controls}.")
        if self.init_prompt is not None and self.attack.init != "other":
            raise MemPruneError("--init-prompt is the start of --init other: give --init other with it.")
        if any(k < 0 for k in self.budget_steps):
            raise MemPruneError(f"--budget-steps must be 0 or more, got {', '.join(map(str, self.budget_steps))}.")
        self.attack = replace(self.attack, checkpoints=budget_checkpoints(tuple(self.budget_steps),
                                                                          self.attack.attack_steps))
        if self.generation.steps < 1 or self.generation.seeds < 1:
            raise MemPruneError("--steps and --seeds must be at least 1.")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise MemPruneError(f"--num-prompts must be at least 1, got {self.num_prompts}.")
        if self.threshold is not None:
            require_finite(self.threshold, "--threshold")  # settings built in code bypass the CLI's check
        if self.threshold is not None and self.threshold_from is not None:
            raise MemPruneError("Give either --threshold or --threshold-from, not both.")
        if not 0 < self.threshold_percentile <= 100:
            raise MemPruneError(f"--threshold-percentile must be in (0, 100], got {self.threshold_percentile}.")
        if self.sscd is None and self.similarity not in ("ssim", "l2"):
            raise MemPruneError(f"Unknown similarity '{self.similarity}': use ssim or l2, or give --sscd FILE.")
        self.fixed_thresholds = check_fixed_thresholds(self.fixed_thresholds, backend_name(self.similarity, self.sscd))
        seeds = range(self.generation.seed, self.generation.seed + self.generation.seeds)
        if self.attack.attack_seed in seeds:
            raise MemPruneError(f"--attack-seed {self.attack.attack_seed} is one of the generation seeds "
                                f"{seeds.start}..{seeds.stop - 1}: the attack must be scored on fresh seeds.")

    def check_inputs(self) -> None:
        """Refuse settings without memorized prompts or without a way to set the copy threshold."""
        _ = self.prompts_file
        if self.control is None and self.threshold is None and self.threshold_from is None:
            raise MemPruneError(NO_THRESHOLD)

    @property
    def prompts_file(self) -> str:
        """--prompts, refused when missing."""
        if self.prompts is None:
            raise MemPruneError("--prompts is required: the attack needs the memorized prompts.")
        return self.prompts

    def edited_models(self) -> dict[str, str]:
        """The names evaluate gives these folders (one --edited: "edited"; several: by folder, as --compare)."""
        return edited_model_names(list(self.edited), by_folder=len(self.edited) > 1)

    @property
    def group(self) -> str:
        return "memorized_held_out" if self.exclude_prompts is not None else "memorized"


# --------------------------------------------------------------------------------------------- threshold

def read_threshold(folder: str | Path, settings: AttackRunSettings) -> tuple[float, dict]:
    """The copy threshold of an evaluate output folder, refused when its similarity backend is not this run's."""
    folder = Path(folder)
    metrics_path = folder / "metrics.csv"
    if not metrics_path.is_file():
        raise MemPruneError(f"--threshold-from '{folder}' has no metrics.csv: "
                            "give an output folder of memprune evaluate.")
    metrics = read_metrics_csv(metrics_path)
    rows = metrics[metrics.metric == "copy_threshold"]
    if rows.empty:
        raise MemPruneError(f"'{metrics_path}' has no copy_threshold row: give an output folder of memprune evaluate.")
    theirs = read_run_settings(folder)
    if theirs and (theirs.get("sscd") is not None) != (settings.sscd is not None) or (
            theirs and settings.sscd is None and theirs.get("similarity") != settings.similarity):
        raise MemPruneError(f"The evaluate run in '{folder}' used another similarity backend "
                            f"({theirs.get('sscd') or theirs.get('similarity')}): use the same --similarity/--sscd.")
    value = float(rows.value.iloc[0])
    if not math.isfinite(value):
        raise MemPruneError(f"'{metrics_path}' has a copy_threshold of {value}, not a finite number: give an output "
                            "folder of memprune evaluate.")
    return value, {"value": value, "source": str(metrics_path), "description": f"copy_threshold of '{metrics_path}'"}


def calibrate(pipe, backend, control: PromptList, pool: torch.Tensor, settings: AttackRunSettings, size,
              progress: bool) -> tuple[float, dict]:
    """evaluate's threshold: percentile of the unedited control generations' similarity to their nearest training
    image."""
    images = [image.detach().to("cpu", torch.float32).clamp(0, 1) for _, _, image in generate(
        pipe, control.prompts, settings.generation, output_type="pt", progress=progress, desc="calibration")]
    nearest = backend.matrix(backend.features(torch.stack(images)), backend.features(pool)).max(dim=1).values.numpy()
    value = calibrate_threshold(nearest, settings.threshold_percentile)
    return value, {
        "value": value, "percentile": settings.threshold_percentile, "generations": len(nearest),
        "description": f"{settings.threshold_percentile:g}th percentile of the similarity of {len(nearest)} unedited "
                       f"generations of '{control.source}' to their nearest of {len(pool)} known training images "
                       f"(seeds {settings.generation.seed}.."
                       f"{settings.generation.seed + settings.generation.seeds - 1}, "
                       f"{settings.generation.steps} steps); backend {backend.name}",
    }


# --------------------------------------------------------------------------------------------- run

@dataclass
class AttackRun:
    metrics: pd.DataFrame
    per_prompt: pd.DataFrame
    generations: pd.DataFrame
    threshold: float
    threshold_info: dict
    backend: str
    notes: list[str]
    timings: dict[str, float]
    budget: pd.DataFrame = field(default_factory=pd.DataFrame)  # the attack-budget curve (memprune.attack.budget)


def select_prompts(settings: AttackRunSettings) -> PromptList:
    """The memorized prompts to attack: those with a training image, minus --exclude-prompts, the first
    --num-prompts."""
    prompts = read_prompts(settings.prompts_file)
    if not prompts.images or not any(prompts.images):
        raise MemPruneError(f"Prompt file '{settings.prompts}' has no image column: the attack needs each memorized "
                            "prompt's training image.")
    keep = [i for i, image in enumerate(prompts.images) if image]
    if settings.exclude_prompts is not None:
        used = set(read_prompts(settings.exclude_prompts).prompts)
        held_out = [i for i in keep if prompts.prompts[i] not in used]
        if len(held_out) == len(keep) and not used & set(prompts.prompts):
            raise MemPruneError(f"None of the captions in '{settings.exclude_prompts}' is a prompt of "
                                f"'{settings.prompts}': "
                                "was it written by locate on another memorized file?")
        keep = held_out
    if not keep:
        raise MemPruneError(f"No prompt of '{settings.prompts}' is left to attack (all excluded or without an image).")
    excluded = ", not in --exclude-prompts" if settings.exclude_prompts is not None else ""
    require_available(settings.num_prompts, len(keep), "--num-prompts",
                      f"prompts of '{settings.prompts}' to attack (with a training image{excluded})")
    keep = keep[: settings.num_prompts] if settings.num_prompts else keep
    for i in keep:
        if not Path(prompts.image(i)).is_file():
            raise MemPruneError(f"Prompt file '{settings.prompts}' row {i + 1}: training image '{prompts.images[i]}' "
                                "does not exist.")
    return prompts.subset(keep)


def attack_metrics(per_prompt: pd.DataFrame, generations: pd.DataFrame, settings: AttackRunSettings, threshold: float,
                   models: list[str], calibrated_on: str, groups: list[str] | None = None) -> pd.DataFrame:
    """The tidy metrics of the module docstring, per model and group (default: the memorized group only)."""
    rows = [("unedited", calibrated_on, "copy_threshold", threshold)]
    per_prompt, generations = (frame if "group" in frame else frame.assign(group=settings.group)  # one group's rows
                               for frame in (per_prompt, generations))
    for model, group in ((model, group) for model in models for group in groups or [settings.group]):
        prompts = per_prompt[(per_prompt.model == model) & (per_prompt.group == group)]
        gens = generations[(generations.model == model) & (generations.group == group)]
        add = lambda metric, value, model=model, group=group: rows.append(  # noqa: E731
            (model, group, metric, float(value)))
        add("n_prompts", len(prompts))
        add("n_generations", len(gens) // 2)
        for attacked, suffix in ((False, ""), (True, "_attacked")):
            values = gens[gens.attacked == attacked].copy_similarity.to_numpy()
            add(f"memorization_rate{suffix}", memorization_rate(values, threshold))
            add(f"copy_similarity{suffix}", values.mean())
            for metric, rate in fixed_rates(values, settings.fixed_thresholds, f"memorization_rate{suffix}").items():
                add(metric, rate)
        add("denoising_loss", prompts.denoising_loss.mean())
        add("denoising_loss_attacked", prompts.denoising_loss_attacked.mean())
        add("perturbation_norm_relative", prompts.perturbation_norm_relative.mean())
        add("attack_seconds_per_prompt", prompts.attack_seconds.mean())
    return pd.DataFrame(rows, columns=["model", "group", "metric", "value"])


def copy_threshold(settings: AttackRunSettings, pipe, backend, size, progress: bool,
                   timings: dict[str, float]) -> tuple[float, dict]:
    """The threshold of the module docstring and its description; a given one is filed under the attacked group."""
    calibrated_on = settings.group
    if settings.threshold is not None:
        threshold, info = settings.threshold, {"value": settings.threshold, "description": "given with --threshold"}
    elif settings.threshold_from is not None:
        threshold, info = read_threshold(settings.threshold_from, settings)
    else:
        assert settings.control is not None  # check_inputs: without a threshold a --control is given
        control = read_prompts(settings.control)
        known = (read_prompts(settings.prompts_file).images or []) + (control.images or [])
        pool_paths = list(dict.fromkeys(p for p in known if p))
        if not pool_paths:
            raise MemPruneError(f"No training images in '{settings.prompts}' or '{settings.control}' to calibrate the "
                                "copy threshold on: give --threshold.")
        pool = torch.stack([load_image(path, size) for path in pool_paths])
        tic = time.perf_counter()
        threshold, info = calibrate(pipe, backend, control, pool, settings, size, progress)
        timings["calibration"] = round(time.perf_counter() - tic, 3)
        calibrated_on = CONTROL_GROUP  # --control is the same-style role of evaluate
    info["calibrated_on"] = calibrated_on
    return threshold, info


def attack(settings: AttackRunSettings, device: str = "auto", dtype=None, progress: bool = True,
           log: Callable[[str], None] | None = None, processes: Processes | None = None) -> AttackRun | None:
    """Attack the unedited model and every edited model (module docstring); models are loaded one at a time. With
    `processes` this process attacks its share; the main process returns the run, the others None."""
    processes = processes or Processes()
    main = processes.is_main
    log = log if log is not None and main else (lambda message: None)
    settings.check_inputs()
    notes, timings = [], {}
    edited = settings.edited_models()
    for folder in edited.values():
        notes.append(check_edited(settings.model, folder))
    prompts = select_prompts(settings)
    controls = control_groups(settings.controls, settings.unseen, settings.num_controls, len(prompts))
    if not controls:
        notes.append("No control group (--controls, --unseen): the attacked rates have no false-positive floor beside "
                     "them.")
    others = init_other(settings, notes)
    if settings.threshold_from is not None:
        read_threshold(settings.threshold_from, settings)  # not an evaluate output: refused before loading
    backend = make_backend(settings.similarity, settings.sscd)
    log(f"Similarity backend: {backend.description}")
    target = resolve_device(device)

    tic = time.perf_counter()
    pipe = load_pipeline(settings.model, target, dtype)
    if not uses_cfg(pipe, settings.generation):
        notes.append("No classifier-free guidance (guidance scale <= 1): generations use the conditional branch only.")
    size = asked_size(pipe, settings.generation.height, settings.generation.width)
    groups = []
    for group_name, members in {settings.group: prompts, **controls}.items():
        images = [load_image(members.image(i), size) for i in range(len(members))]
        groups.append(AttackGroup(group_name, members, images, backend.features(torch.stack(images))))
    base_print = text_fingerprint(pipe)
    for folder in edited.values():  # refuse a foreign text side before minutes of attacking
        components = text_side(folder)
        if components is not None:
            check_same_text_side(base_print, text_fingerprint(components), folder)
    timings["load_unedited"] = round(time.perf_counter() - tic, 3)

    threshold, info = 0.0, {"calibrated_on": settings.group}
    if main:  # only the main process makes rows: the others need no threshold
        threshold, info = copy_threshold(settings, pipe, backend, size, progress, timings)
        log(f"Copy threshold: {threshold:.4f} ({info['description']}).")

    jobs = jobs_of(groups)
    local: dict[tuple, Any] = {}
    for name in ["unedited", *edited]:
        if name != "unedited":
            tic = time.perf_counter()
            del pipe
            pipe = load_pipeline(edited[name], target, dtype)
            check_same_text_side(base_print, text_fingerprint(pipe), edited[name])
            timings[f"load_{name}"] = round(time.perf_counter() - tic, 3)
        tic = time.perf_counter()
        for place in tqdm(share(len(jobs), processes), desc=f"attack {name}", disable=not (progress and main),
                          leave=False):
            group, i = jobs[place]
            if processes.faults is not None:  # memprune.distributed.FAULT_ENV: tests of a failing process
                processes.faults.before_call()
            local[name, place] = run_job(pipe, group, i, backend, settings, size, others)
        local["seconds", name, processes.rank] = time.perf_counter() - tic
    gathered = gather_in_order(processes, local)
    if gathered is None:
        return None
    per_prompt, generations, budget = [], [], []
    for name in ["unedited", *edited]:
        rows, gens, curve = [], [], []
        for place in range(len(jobs)):
            row, gen, points = job_rows(name, gathered[name, place], threshold, settings)
            rows.append(row)
            gens += gen
            curve += points
        timings[f"attack_{name}"] = round(sum(gathered["seconds", name, rank] for rank in range(processes.world)), 3)
        per_prompt += rows
        generations += gens
        budget += curve
        mean = lambda metric, group, rows=rows: np.mean([r[metric] for r in rows if r["group"] == group])  # noqa: E731
        rates = ", ".join(f"{group.name} {mean('memorization_rate', group.name):.1%} -> "
                          f"{mean('memorization_rate_attacked', group.name):.1%}" for group in groups)
        log(f"{name}: copy rate unattacked -> under attack: {rates} ({timings[f'attack_{name}']:.0f} s).")
    per_prompt, generations = pd.DataFrame(per_prompt), pd.DataFrame(generations)
    metrics = attack_metrics(per_prompt, generations, settings, threshold, ["unedited", *edited], info["calibrated_on"],
                             [group.name for group in groups])
    return AttackRun(metrics, per_prompt, generations, threshold, info, backend.description, notes, timings,
                     budget_curve(pd.DataFrame(budget), threshold))


def init_other(settings: AttackRunSettings, notes: list[str]) -> list[str] | None:
    """The starts of --init other (memprune.attack.groups.other_prompts), said in the notes; None for other inits."""
    if settings.attack.init != "other":
        return None
    fallback = next((path for path in (settings.controls, settings.control) if path not in (None, "none")), None)
    others = other_prompts(settings.init_prompt, None if fallback is None else read_prompts(fallback))
    source = "--init-prompt" if settings.init_prompt is not None else f"the first caption of '{fallback}'"
    second = f"; for that caption itself, '{others[1]}'" if len(others) > 1 else ""
    notes.append(f"--init other starts every attack from the embedding of '{others[0]}' ({source}{second}).")
    return others
