"""`memprune evaluate`: generate with fixed seeds from the unedited and edited models and measure memorization,
diversity, utility, detection and cost (memprune.evaluation). `--compare DIR` (repeatable) adds more edited models
as further columns, all from the same seeds; with it every edited model is named by its folder.

Writes metrics.csv (tidy: model, group, metric, value), generations.csv, metrics.md, grids/ (one image grid per
group), copy_similarity_ecdf.png (when training images are known) and run.json, atomically.

`--processes N` (or `accelerate launch -m memprune evaluate ...`) splits the pipeline calls over processes
(memprune.work_split); the main process scores and writes alone, so the folder is the one a single process writes.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from ..distributed import Processes
from ..errors import MemPruneError
from ..evaluation.inputs import read_sources
from ..evaluation.report import metrics_markdown, summary_table, threshold_lines
from ..evaluation.run import EvaluationResult, evaluate
from ..evaluation.settings import PROMPT_ROLES, EvaluateSettings
from ..generate import call_plan
from ..prune import PRUNE_INFO
from ..work_split import check_work, on_processes
from . import defaults
from .output import ProgressLog, atomic_output_dir, refuse_output, write_run_json

TESTBED_ROLES = ("memorized", "control", "general")  # the prompt roles a testbed fills when not given


def with_testbed_defaults(settings: EvaluateSettings) -> EvaluateSettings:
    """Fill the testbed's caption files where none were given; require --memorized/--reference otherwise.

    Idempotent; "none" stays in the settings (as given) and means "no such group".
    """
    values: dict[str, Any] = {}  # EvaluateSettings fields, by role name
    if defaults.is_testbed(settings.model):
        for role in TESTBED_ROLES:
            if getattr(settings, role) is None:
                values[role] = defaults.testbed_file(settings.model, role)
    else:
        for role in ("memorized", "reference"):
            if getattr(settings, role) is None:
                raise MemPruneError(f"--{role} is required when --model is not the embedded testbed.")
    settings = replace(settings, **values)
    settings.check_prompt_files()
    return settings


def run_evaluation(settings: EvaluateSettings, pipe=None, edited_pipe=None, device: str = "auto", dtype=None,
                   progress: bool = True, log: Callable[[str], None] | None = None,
                   processes: Processes | None = None) -> EvaluationResult | None:
    """memprune.evaluation.run.evaluate with the command's inputs: the testbed's default prompt files and, on a
    testbed, its attribute classifier. With `processes`, None on every process but the main one."""
    settings = with_testbed_defaults(settings)
    classifier: Literal["testbed"] | None = "testbed" if defaults.is_testbed(settings.model) else None
    extra = {} if processes is None else {"processes": processes}
    return evaluate(settings, pipe=pipe, edited_pipe=edited_pipe, attribute_classifier=classifier, device=device,
                    dtype=dtype, progress=progress, log=log, **extra)


def check_work_size(settings: EvaluateSettings, world: int) -> None:
    """Refuse more processes than pipeline calls of one model (the unit each process takes a share of)."""
    sources, _ = read_sources(settings)
    calls = sum(len(call_plan(prompts.prompts, settings.generation)) for prompts in sources.values())
    prompts = sum(len(prompts) for prompts in sources.values())
    check_work(world, calls, "pipeline calls", f"{prompts} prompts in {len(sources)} files x "
               f"{settings.generation.seeds} seeds in batches of {settings.generation.batch_size}")


def evaluate_to_folder(settings: EvaluateSettings, out, overwrite: bool = False, device: str = "auto", dtype=None,
                       progress: bool = True, log: Callable[[str], None] | None = None, processes: int = 1) -> str:
    """The `memprune evaluate` command as a function: writes the folder, returns the summary to print ('' on a
    launcher's other processes). `processes > 1` runs it in that many local processes (memprune.work_split)."""
    settings = with_testbed_defaults(settings)
    protected = refuse_output(out, overwrite, settings.model, *settings.edited_models().values())
    progress_log = ProgressLog(log)
    command = dict(settings=settings, out=str(out), overwrite=overwrite, device=device, dtype=dtype,
                   progress=progress, log=log)
    outcome = on_processes(processes, evaluate_to_folder, command, check_work_size, run_evaluation, progress_log)
    if isinstance(outcome, str):
        return outcome  # the spawned processes' summary, or '' on a launcher's other processes
    group, result = outcome
    with atomic_output_dir(out, overwrite, protected) as staging:
        result.metrics.to_csv(staging / "metrics.csv", index=False)
        result.generations.to_csv(staging / "generations.csv", index=False)
        grids = write_grids(result, staging, settings.grid_prompts)
        (staging / "metrics.md").write_text(metrics_markdown(result, settings, grids))
        write_run_json(staging, settings, _inputs(settings), result.timings, similarity_backend=result.backend,
                       copy_threshold=result.threshold_info, notes=result.notes, random_controls=result.random_controls,
                       groups={name: len(members.members) for name, members in result.groups.items()},
                       processes=group.world)
    group.barrier()
    return summary(result, out, progress_log)


def write_grids(result: EvaluationResult, folder: Path, grid_prompts: int) -> list[str]:
    """grids/<group>.png (one per group that is not a pool of files nor a copy of another) and the copy-similarity
    ECDF when training images are known; returns their paths relative to `folder`."""
    from ..plots import copy_similarity_ecdf, image_grid, save_figure  # matplotlib loads only when a folder is written

    written = []
    if grid_prompts:
        (folder / "grids").mkdir()
        seen = []
        for name, group in result.groups.items():
            pooled = len({source for source, _ in group.members}) > 1
            if pooled or group.members in seen:
                continue
            seen.append(group.members)
            image_grid(result, name, grid_prompts).save(folder / "grids" / f"{name}.png")
            written.append(f"grids/{name}.png")
    if result.generations.copy_similarity.notna().any():
        save_figure(copy_similarity_ecdf(result), folder / "copy_similarity_ecdf.png")
        written.append("copy_similarity_ecdf.png")
    return written


def _inputs(settings: EvaluateSettings) -> dict[str, str | None]:
    """The input files run.json records (with their hashes): prompt files by role, SSCD, each edit's memprune.json."""
    inputs = {role: settings.prompt_file(role) for role in PROMPT_ROLES}
    inputs["exclude_prompts"] = settings.exclude_prompts
    inputs["sscd"] = settings.sscd
    inputs.update(clip_model=settings.clip_model, inception=settings.inception, fid_reference=settings.fid_reference,
                  fid_prompts=settings.fid_prompts)
    for name, folder in settings.edited_models().items():
        inputs[f"{name}_memprune_json"] = str(Path(folder) / PRUNE_INFO)
    return inputs


def summary(result: EvaluationResult, out, printed: ProgressLog | None = None) -> str:
    """The lines the command prints at the end, less those `printed` already printed while it ran."""
    lines = [f"Similarity backend: {result.backend}", *threshold_lines(result)]
    lines += [f"Note: {note}" for note in result.notes]
    lines = printed.unsaid(lines) if printed is not None else lines
    lines.append(summary_table(result))
    lines.append(f"Metrics: {Path(out) / 'metrics.csv'} and {Path(out) / 'metrics.md'}")
    return "\n".join(lines)
