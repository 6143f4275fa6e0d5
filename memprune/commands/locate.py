"""`memprune locate`: select the weights of a weight edit and write its masks folder.

Two paths, chosen by what the method's `edit` needs (methods.MethodInfo.needs): Wanda-like edits select from
activation statistics that `memprune.locate` records (in several processes, resumable, with the subset-overlap
analysis); every other locate-stage edit (NeMo, one registered from outside) is given the memorized and reference
prompt lists and writes masks, prompts_used.csv, its own tables and run.json.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import methods
from ..errors import MemPruneError
from ..generate import GenerationSettings, call_plan
from ..locate import LocateSettings, locate, memorized_prompts, save_locate_result
from ..prompts import read_prompts, require_available, write_prompts
from .defaults import file_or_testbed_default, model_or_default, testbed_file
from .output import Timer, atomic_output_dir, check_output_dir, protected_sources, refuse_output, write_run_json


def run(options: dict[str, Any]) -> str:
    """`memprune locate` with the CLI's options (named as its parameters); the summary ('' on a launcher's other
    processes)."""
    memorized = file_or_testbed_default(options["model"], options["memorized"], "memorized", "--memorized")
    module = methods.get(options["method"], "weight_edit")
    if module.METHOD.needs == "statistics":
        return _locate_from_statistics(module, options, memorized)
    return _locate_from_prompts(module, options, memorized)


def _locate_from_statistics(module, options: dict[str, Any], memorized: str) -> str:
    model = options["model"]
    control = options["control"]
    if options["subsets"] and control is None:
        control = testbed_file(model, "control")
    settings = LocateSettings(
        model=model_or_default(model),
        memorized=memorized,
        memorized_label=options["memorized_label"],
        reference="empty" if options["reference"] is None else options["reference"],
        generation=GenerationSettings(steps=options["steps"], seeds=1 if options["seeds"] is None else options["seeds"],
                                      seed=options["seed"], guidance_scale=options["guidance_scale"],
                                      batch_size=options["batch_size"], height=options["height"],
                                      width=options["width"]),
        selection=module.settings_from_options(options),
        half=options["half"],
        num_prompts=options["num_prompts"],
        sample_seed=options["sample_seed"],
        subsets=options["subsets"],
        subset_size=options["subset_size"],
        control=control,
    )
    return locate_to_folder(settings, options["out"], overwrite=options["overwrite"], device=options["device"],
                            dtype=options["dtype"], processes=options["processes"], resume=options["resume"],
                            checkpoint_seconds=options["checkpoint_every"])


def check_work_size(settings: LocateSettings, world: int) -> None:
    """Refuse more processes than pipeline calls: each process needs at least one call of the memorized set."""
    count = len(memorized_prompts(settings))
    calls = len(call_plan([""] * count, settings.generation))
    if world > calls:
        raise MemPruneError(
            f"--processes {world} is more than the work: {count} memorized prompts x {settings.generation.seeds} seeds "
            f"in batches of {settings.generation.batch_size} make {calls} pipeline calls; "
            f"use at most {calls} processes "
            "or a smaller --batch-size.")


def check_prompt_files(settings: LocateSettings) -> None:
    """Refuse bad prompt files and counts before a model loads or a process starts."""
    memorized = read_prompts(settings.memorized, label=settings.memorized_label)
    check_counts(settings.memorized, len(memorized), settings.num_prompts, settings.subsets and settings.subset_size)
    if settings.subsets and settings.control is not None:
        require_available(settings.subset_size, len(read_prompts(settings.control)), "--subset-size",
                          f"control prompts in '{settings.control}'")
    if settings.reference != "empty":
        read_prompts(settings.reference)


def check_counts(memorized: str, available: int, num_prompts: int | None, subset_size: int | None = None) -> None:
    """--num-prompts and --subset-size may not ask for more memorized prompts than the file holds: refused before
    any work, the way attack refuses its --num-prompts (the subsets are drawn from the whole file)."""
    what = f"memorized prompts in '{memorized}'"
    require_available(num_prompts, available, "--num-prompts", what)
    require_available(subset_size or None, available, "--subset-size", what)


def resume_fingerprint(settings: LocateSettings, dtype, world: int) -> dict:
    """Every setting the recorded statistics depend on, named like the CLI options (selection settings are not:
    a resumed run may select with another --ratio)."""
    from ..masks import file_sha256

    def sha256(path):
        return file_sha256(Path(path)) if path and Path(path).is_file() else None

    generation = settings.generation
    return {
        "command": "locate", "model": str(settings.model),
        "memorized": str(settings.memorized), "memorized_sha256": sha256(settings.memorized),
        "label": settings.memorized_label,
        "reference": settings.reference, "reference_sha256": sha256(settings.reference),
        "control": settings.control, "control_sha256": sha256(settings.control),
        "steps": generation.steps, "seeds": generation.seeds, "seed": generation.seed,
        "guidance_scale": generation.guidance_scale, "batch_size": generation.batch_size,
        "height": generation.height, "width": generation.width, "half": settings.half,
        "num_prompts": settings.num_prompts, "sample_seed": settings.sample_seed, "subsets": settings.subsets,
        "subset_size": settings.subset_size, "dtype": str(dtype or "torch.float32").replace("torch.", ""),
        "processes": world,
    }


def locate_to_folder(settings: LocateSettings, out, overwrite: bool = False, device: str = "auto", dtype=None,
                     processes: int = 1, resume: bool = False, checkpoint_seconds: float = 60.0) -> str:
    """The `memprune locate` command as a function: load, locate, write the folder atomically; return a summary.

    `processes > 1` runs it in that many local processes (see memprune.distributed); under a launcher
    (accelerate launch) this process does its share and only the main one writes. Running statistics are saved in
    OUT.partial every `checkpoint_seconds`; `resume` continues from them."""
    from ..checkpoint import open_partial
    from ..distributed import check_devices, current_processes, spawn
    from ..masks import summarize_overlap
    from ..models import load_pipeline, resolve_device
    from ..plots import write_locate_plots

    protected = protected_sources(settings.model)
    if processes < 1:
        raise MemPruneError(f"--processes must be at least 1, got {processes}.")
    if processes > 1:
        check_output_dir(out, overwrite, protected)
        check_prompt_files(settings)
        check_work_size(settings, processes)  # before starting any process
        check_devices(device, processes)
        return spawn(processes, locate_to_folder, dict(settings=settings, out=str(out), overwrite=overwrite,
                                                       device=device, dtype=dtype, resume=resume,
                                                       checkpoint_seconds=checkpoint_seconds))
    group = current_processes(device)
    check_output_dir(out, overwrite, protected)
    check_prompt_files(settings)
    check_work_size(settings, group.world)
    partial, resumed = open_partial(out, resume_fingerprint(settings, dtype, group.world), resume, overwrite, group,
                                    checkpoint_seconds)
    timer = Timer()
    try:
        with timer("load"):
            # a launcher's process group brings its own device per rank
            target = group.device if group.device is not None else resolve_device(device)
            pipe = load_pipeline(settings.model, target, dtype)
        with timer("locate"):
            result = locate(settings, pipe, processes=group, partial=partial)
        if group.is_main:
            with atomic_output_dir(out, overwrite, protected) as staging:
                save_locate_result(result, staging)
                write_locate_plots(staging, result.masks, result.overlap)
                inputs = {"memorized": settings.memorized, "reference": settings.reference, "control": settings.control}
                write_run_json(staging, settings, inputs, timer.seconds, model=result.masks.meta["model"],
                               processes=group.world, resumed=resumed)
        group.barrier()  # the others wait until the output is written: a failure of the main process stops them all
    except BaseException:
        if group.is_main and not partial.holds_statistics():
            partial.remove()  # nothing to resume from: do not make the next run ask for --resume
        raise
    if not group.is_main:
        return ""  # the main process reports for all
    partial.remove()
    counts = result.masks.count()
    lines = [
        f"Located {sum(counts.values())} weight selections over {len(result.masks.layers)} layers x "
        f"{len(result.masks.steps)} steps from {len(result.prompts)} memorized prompts"
        + (f" in {group.world} processes" if group.distributed else "") + (", resumed" if resumed else "") + ".",
        *_kept_line(result.masks),
        f"Mask steps are denoiser calls: {result.masks.meta['denoiser_calls']['text']} "
        "(prune --timesteps counts denoiser calls).",
        f"Masks: {Path(out) / 'masks.safetensors'}",
    ]
    if result.overlap is not None:
        lines.append("Subset overlap (mean IoU):\n" + summarize_overlap(result.overlap).round(3).to_string())
        lines.append(f"Overlap table: {Path(out) / 'overlap.csv'}")
    return "\n".join(lines)


def _kept_line(masks) -> list[str]:
    """k per row (the paper's units) and the ratio it corresponds to, over layers."""
    kept = masks.meta.get("k_per_row", {})
    if not kept:
        return []
    ratios = [kept[layer] / masks.shapes[layer][1] for layer in kept]
    return [f"Columns kept per output row: k = {min(kept.values())}..{max(kept.values())} "
            f"(ratio k/H = {min(ratios):.4g}..{max(ratios):.4g}); per layer in masks.json."]


# ------------------------------------------------------------------------------------------ edits given prompts

def prompt_reference(model: str | None, reference: str | None) -> str | None:
    """The non-memorized prompts of a prompt-given edit: the given file; on a testbed by default its
    general_train.csv (never the held-out captions, which evaluate scores)."""
    return reference if reference is not None else testbed_file(model, "general_train")


def nemo_reference(model: str | None, reference: str | None) -> str:
    """NeMo's non-memorized prompts (prompt_reference, refused when there are none)."""
    return methods.get("nemo", "weight_edit").check_reference(prompt_reference(model, reference))


@dataclass
class EditLocateSettings:
    """What `locate` feeds a prompt-given weight edit; `method_settings` are the method's own."""

    model: str
    method: str
    memorized: str
    reference: str | None  # file of non-memorized prompts
    method_settings: Any = None
    memorized_label: str | None = None
    num_prompts: int | None = None
    sample_seed: int = 0
    reference_prompts: int | None = None  # None: all of the file (seeded order)


def _locate_from_prompts(module, options: dict[str, Any], memorized: str) -> str:
    reference = prompt_reference(options["model"], options["reference"])
    method_settings = module.settings_from_options({**options, "reference": reference})
    settings = EditLocateSettings(model=model_or_default(options["model"]), method=module.METHOD.name,
                                  memorized=memorized, reference=reference, method_settings=method_settings,
                                  memorized_label=options["memorized_label"], num_prompts=options["num_prompts"],
                                  sample_seed=options["sample_seed"])
    return edit_to_folder(settings, options["out"], overwrite=options["overwrite"], device=options["device"],
                          dtype=options["dtype"])


def edit_to_folder(settings: EditLocateSettings, out, overwrite: bool = False, device: str = "auto", dtype=None) -> str:
    """A prompt-given weight edit as a function: the same kind of folder as locate (masks, prompts_used.csv, run.json)
    plus the method's own tables (e.g. NeMo's nemo_prompts.csv: per prompt θ, neuron counts, similarities)."""
    from ..models import denoiser, load_pipeline, model_identity, prunable_layer_shapes, resolve_device
    from ..prompts import seeded_subsets

    module = methods.get(settings.method, "weight_edit")
    protected = refuse_output(out, overwrite, settings.model)
    memorized = read_prompts(settings.memorized, label=settings.memorized_label)
    check_counts(settings.memorized, len(memorized), settings.num_prompts)
    if settings.num_prompts is not None:
        memorized = memorized.subset(seeded_subsets(len(memorized), 1, settings.num_prompts, settings.sample_seed)[0])
    reference: list[str] = []
    if settings.reference is not None and settings.reference != "empty":
        captions = read_prompts(settings.reference).prompts
        order = np.random.default_rng(settings.sample_seed).permutation(len(captions))
        reference = [captions[i] for i in order[: settings.reference_prompts]]
    timer = Timer()
    with timer("load"):
        pipe = load_pipeline(settings.model, resolve_device(device), dtype)
    identity = model_identity(settings.model, pipe)
    identity["layer_shapes"] = prunable_layer_shapes(denoiser(pipe))
    meta = {"model": identity, "prompts": memorized.prompts,
            "settings": {"reference": settings.reference, "reference_prompts": len(reference)}}
    with timer("locate"):
        masks = module.edit(pipe, settings.method_settings, memorized=memorized.prompts, reference=reference, meta=meta)
    tables: dict[str, pd.DataFrame] = module.tables(masks) if hasattr(module, "tables") else {}
    with atomic_output_dir(out, overwrite, protected) as staging:
        masks.save(staging)
        write_prompts(memorized.prompts, Path(staging) / "prompts_used.csv")
        for name, table in tables.items():
            table.to_csv(Path(staging) / name, index=False)
        inputs = {"memorized": settings.memorized, "reference": settings.reference}
        write_run_json(staging, settings, inputs, timer.seconds, model=identity)
    if hasattr(module, "summary"):
        return module.summary(masks, len(memorized), timer.seconds.get("locate", 0), out)
    counts = masks.count()
    return (f"{settings.method} selected {sum(counts.values())} weights over {len(masks.layers)} layers x "
            f"{len(masks.steps)} steps from {len(memorized)} memorized prompts.\n"
            f"Masks: {Path(out) / 'masks.safetensors'}")
