"""`memprune attack`: the DoRI-style robustness check of memprune.attack on the unedited and every edited model.

Writes metrics.csv (tidy model, group, metric, value), metrics.md (the headline rates, model × group),
per_prompt.csv, generations.csv, budget.csv and budget.png (the attack-budget curve) and run.json, atomically.

`--processes N` (or `accelerate launch -m memprune attack ...`) splits the (group, prompt) jobs over processes
(memprune.work_split); the main process scores and writes alone, so the folder is the one a single process writes.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..attack.budget import write_budget
from ..attack.groups import control_groups
from ..attack.run import NO_THRESHOLD, AttackRun, AttackRunSettings, attack, select_prompts
from ..errors import MemPruneError
from ..prompts import read_prompts
from ..work_split import check_work, on_processes
from . import defaults
from .output import ProgressLog, atomic_output_dir, refuse_output, write_run_json

SUMMARY_METRICS = ["memorization_rate", "memorization_rate_attacked", "copy_similarity", "copy_similarity_attacked"]


def with_testbed_defaults(settings: AttackRunSettings) -> AttackRunSettings:
    """The testbed's memorized captions as --prompts; unless a threshold is given, its same-style captions as
    --control; its same-style captions as --controls and its unseen ones (when the testbed has them) as --unseen.
    Off a testbed --prompts and a threshold source must be given, and --controls defaults to --control when that
    file has images."""
    values: dict[str, Any] = {}  # AttackRunSettings fields, by name
    testbed = defaults.is_testbed(settings.model)
    if settings.prompts is None:
        if not testbed:
            raise MemPruneError("--prompts is required when --model is not the embedded testbed.")
        values["prompts"] = defaults.testbed_file(settings.model, "memorized")
    if settings.control is None and settings.threshold is None and settings.threshold_from is None:
        if not testbed:
            raise MemPruneError(NO_THRESHOLD)
        values["control"] = defaults.testbed_file(settings.model, "control")
    if settings.controls is None:
        if testbed:
            values["controls"] = defaults.testbed_file(settings.model, "control")
        elif settings.control is not None and any(read_prompts(settings.control).images or []):
            values["controls"] = settings.control
    unseen = defaults.testbed_file(settings.model, "unseen")
    if settings.unseen is None and unseen is not None and Path(unseen).is_file():
        values["unseen"] = unseen
    return replace(settings, **values)


def check_work_size(settings: AttackRunSettings, world: int) -> None:
    """Refuse more processes than (group, prompt) jobs of one model (the unit each process takes a share of)."""
    settings.check_inputs()
    prompts = select_prompts(settings)
    controls = control_groups(settings.controls, settings.unseen, settings.num_controls, len(prompts))
    jobs = len(prompts) + sum(len(members) for members in controls.values())
    check_work(world, jobs, "attacks per model",
               f"{len(prompts)} prompts to attack and {jobs - len(prompts)} control captions")


def attack_to_folder(settings: AttackRunSettings, out, overwrite: bool = False, device: str = "auto", dtype=None,
                     progress: bool = True, log: Callable[[str], None] | None = None, processes: int = 1) -> str:
    """The `memprune attack` command as a function: writes the folder, returns the summary to print ('' on a
    launcher's other processes). `processes > 1` runs it in that many local processes (memprune.work_split)."""
    settings = with_testbed_defaults(settings)
    protected = refuse_output(out, overwrite, settings.model, *settings.edited)
    progress_log = ProgressLog(log)
    command = dict(settings=settings, out=str(out), overwrite=overwrite, device=device, dtype=dtype,
                   progress=progress, log=log)
    outcome = on_processes(processes, attack_to_folder, command, check_work_size, attack, progress_log)
    if isinstance(outcome, str):
        return outcome  # the spawned processes' summary, or '' on a launcher's other processes
    group, result = outcome
    with atomic_output_dir(out, overwrite, protected) as staging:
        result.metrics.to_csv(staging / "metrics.csv", index=False)
        result.per_prompt.to_csv(staging / "per_prompt.csv", index=False)
        result.generations.to_csv(staging / "generations.csv", index=False)
        (staging / "metrics.md").write_text(metrics_markdown(result))
        write_budget(result.budget, result.threshold, staging)
        inputs = {"prompts": settings.prompts, "exclude_prompts": settings.exclude_prompts, "control": settings.control,
                  "controls": settings.controls, "unseen": settings.unseen, "sscd": settings.sscd}
        write_run_json(staging, settings, inputs, result.timings, similarity_backend=result.backend,
                       copy_threshold=result.threshold_info, notes=result.notes,
                       models={"unedited": settings.model, **settings.edited_models()}, processes=group.world)
    group.barrier()
    return summary(result, out, progress_log)


def rates_table(result: AttackRun):
    """Model × group: the unattacked and attacked copy rates and similarities (the false-positive floor beside the
    memorized rows)."""
    table = result.metrics[result.metrics.metric.isin(SUMMARY_METRICS)]
    return table.pivot_table(index=["model", "group"], columns="metric", values="value", sort=False)[
        [m for m in SUMMARY_METRICS if m in set(table.metric)]]


def metrics_markdown(result: AttackRun) -> str:
    table = rates_table(result)
    lines = [f"Copy threshold {result.threshold:.4f} ({result.threshold_info['description']}).", "",
             "| model | group | " + " | ".join(table.columns) + " |", "|---|---|" + "---:|" * len(table.columns)]
    for (model, group), row in table.iterrows():
        cells = [f"{value:.1%}" if metric.startswith("memorization") else f"{value:.3f}"
                 for metric, value in row.items()]
        lines.append(f"| {model} | {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary(result: AttackRun, out, printed: ProgressLog | None = None) -> str:
    """The lines the command prints at the end, less those `printed` already printed while it ran."""
    lines = [f"Similarity backend: {result.backend}",
             f"Copy threshold: {result.threshold:.4f} ({result.threshold_info['description']}).",
             *[f"Note: {note}" for note in result.notes]]
    lines = printed.unsaid(lines) if printed is not None else lines
    lines += [rates_table(result).round(4).to_string(),
              f"Metrics: {Path(out) / 'metrics.csv'}; per prompt: {Path(out) / 'per_prompt.csv'}; attack-budget curve: "
              f"{Path(out) / 'budget.png'}"]
    return "\n".join(lines)
