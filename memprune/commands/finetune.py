"""`memprune finetune`: fine-tune the denoiser on retain data with a registered finetune method, save it atomically
with memprune.json, a model card and run.json, and verify the saved weights."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import methods
from ..errors import MemPruneError
from ..finetune import (
    FinetuneSettings,
    apply_delta,
    check_disjoint,
    relative_change,
    trainable_parameters,
    verify_saved,
)
from ..masks import file_sha256
from ..model_card import write_card
from ..models import denoiser, load_pipeline, resolve_device
from ..precision import cast_components, describe, save_dtypes
from ..prompts import read_prompts, write_prompts
from ..prune import PRUNE_INFO
from ..retain import generated_retain_data, image_retain_data, read_image_captions
from ..runinfo import _jsonable
from .defaults import model_or_default, testbed_file
from .output import Timer, atomic_output_dir, refuse_output, write_run_json


def run(options: dict[str, Any]) -> str:
    """`memprune finetune` with the CLI's options."""
    model = model_or_default(options["model"])
    if options.get("retention") is not None and options["method"] != "doco":
        raise MemPruneError("--retention is used by --method doco only.")
    data = options.get("data")
    if data is not None and (options["retain_images"] is not None or options["retain"] is not None):
        raise MemPruneError("Give --data (the images/captions to learn) or --retain/--retain-images, not both.")
    settings = FinetuneSettings(steps=options["steps"], lr=options["lr"], seed=options["seed"],
                                params=options["params"],
                                batch_size=options["batch_size"], retain_prompts=options["retain_prompts"] or None,
                                retain_images=data or options["retain_images"],
                                sampling_steps=options["sampling_steps"],
                                height=options.get("height"), width=options.get("width"))
    method_settings = methods.get(options["method"], "finetune").settings_from_options(options)
    inputs = FinetuneInputs(memorized=options["memorized"], retain=options["retain"], anchors=options["anchors"],
                            from_dir=options.get("from_dir"), protect=options.get("protect"),
                            data_option="--data" if data is not None else "--retain-images")
    # Trained in float32 (Adam on half-precision weights loses small updates); --dtype is the dtype it is saved in.
    return finetune_to_folder(model, options["method"], options["out"], settings, inputs, method_settings,
                              overwrite=options["overwrite"], device=options["device"],
                              save_dtype=options.get("dtype") or "keep")


@dataclass
class FinetuneInputs:
    """The files of a `memprune finetune` run (testbed defaults filled in by `resolve_inputs`)."""

    memorized: str | None = None
    retain: str | None = None
    anchors: str | None = None  # doco only (default: the retain prompts)
    from_dir: str | None = None  # --from: an edit of the model to start from (e.g. a pruned folder)
    protect: str | None = None  # gradproj's selective learning: captions whose images the run must not learn
    data_option: str = "--retain-images"  # what the image/caption input was called (--data or --retain-images)


def default_params(settings: FinetuneSettings, module) -> FinetuneSettings:
    """`settings` with --params resolved: the method's own group (its DEFAULT_PARAMS, else kv) when not given."""
    if settings.params is not None:
        return settings
    return dataclasses.replace(settings, params=getattr(module, "DEFAULT_PARAMS", "kv"))


def resolve_inputs(model: str, inputs: FinetuneInputs, retain_images: str | None) -> FinetuneInputs:
    memorized = inputs.memorized or inputs.protect or testbed_file(model, "memorized")
    retain = inputs.retain
    if retain is not None and retain_images is not None:
        raise MemPruneError("Give --retain FILE or --retain-images DIR, not both: "
                            "the images' captions are the retain prompts.")
    if retain is None and retain_images is None:
        # general_train, never general_heldout: evaluate measures utility on the held-out captions.
        retain = testbed_file(model, "general_train")
        if retain is None:
            raise MemPruneError("--retain FILE (or --retain-images DIR) is required "
                                "when --model is not a memprune testbed.")
    if memorized is None:
        raise MemPruneError("--memorized FILE is required when --model is not a memprune testbed.")
    return FinetuneInputs(memorized=memorized, retain=retain, anchors=inputs.anchors, from_dir=inputs.from_dir,
                          protect=inputs.protect, data_option=inputs.data_option)


def check_protect_option(module, inputs: FinetuneInputs) -> None:
    """--protect belongs to a method that learns selectively (gradproj) and replaces --memorized there."""
    if inputs.protect is None:
        return
    if not callable(getattr(module, "check_protected", None)):
        raise MemPruneError(f"--protect is used by --method gradproj only (selective learning), not by "
                            f"--method {module.METHOD.name}.")
    if inputs.memorized is not None:
        raise MemPruneError("Give --protect (the captions to keep out of what is learned) or --memorized, not both: "
                            "with --protect they define the projected subspace.")


def check_started_from(model: str, folder: str) -> dict:
    """Refuse a --from folder that is not a memprune edit of --model (its memprune.json names another source);
    return what memprune.json of the result records about it."""
    from ..evaluation.inputs import same_model
    from ..models import check_model_source

    check_model_source(folder)
    info_path = Path(folder).expanduser() / PRUNE_INFO
    try:
        edit = json.loads(info_path.read_text()) if info_path.is_file() else {}
        source = edit.get("source")
    except (json.JSONDecodeError, AttributeError):
        edit, source = {}, None
    if source is None:
        raise MemPruneError(f"--from '{folder}' has no valid {PRUNE_INFO} naming its source model, so it cannot be "
                            f"checked to be an edit of --model '{model}': give a folder memprune wrote.")
    if not same_model(str(source), str(model)):
        raise MemPruneError(f"--from '{folder}' was edited from '{source}', not from --model '{model}': "
                            f"use --model {source} or a folder edited from '{model}'.")
    return {"path": str(Path(folder).resolve()), "method": edit.get("method")}


def anchor_notes(model: str, anchors: str | None) -> list[str]:
    """A warning when the anchors are the testbed's same-style control captions, which evaluate scores."""
    control = testbed_file(model, "control")
    if anchors is None or control is None:
        return []
    control_path = Path(control)
    if control_path.is_file() and Path(anchors).resolve() == control_path.resolve():
        return ["the anchors are the testbed's same-style control captions, which `memprune evaluate` scores as its "
                "control group: that group is not held out from this fine-tune."]
    return []


def retain_count_notes(settings: FinetuneSettings, available: int) -> list[str]:
    """--retain-prompts is a cap with a default (128), so a smaller retain file is not refused; the summary and
    memprune.json say how many were used instead of capping silently."""
    if settings.retain_images is None and settings.retain_prompts is not None and settings.retain_prompts > available:
        return [f"--retain-prompts {settings.retain_prompts} is more than the {available} retain captions: all "
                f"{available} were used."]
    return []


def _file_record(path) -> dict | None:
    if path is None:
        return None
    path = Path(path)
    return {"path": str(path.resolve()), "sha256": file_sha256(path)}


def _folder_record(folder) -> dict | None:
    """sha256 over the sorted (name, sha256) list of a folder's files."""
    if folder is None:
        return None
    folder = Path(folder)
    if folder.is_file():  # a CSV of image/caption pairs (--data FILE)
        return _file_record(folder)
    listing = [f"{p.relative_to(folder)}:{file_sha256(p)}" for p in sorted(folder.rglob("*")) if p.is_file()]
    return {"path": str(folder.resolve()), "sha256": hashlib.sha256("\n".join(listing).encode()).hexdigest(),
            "files": len(listing)}


def finetune_to_folder(model: str, method: str, out, settings: FinetuneSettings | None = None,
                       inputs: FinetuneInputs | None = None, method_settings=None, overwrite: bool = False,
                       device: str = "auto", dtype=None, log=print, save_dtype: str = "keep") -> str:
    """The `memprune finetune` command as a function: check inputs, fine-tune, save atomically (in the source's
    dtypes unless `save_dtype` names one), verify."""
    module = methods.get(method, "finetune")
    settings = default_params(settings or FinetuneSettings(), module)
    inputs = inputs or FinetuneInputs()
    started_from = check_started_from(model, inputs.from_dir) if inputs.from_dir else None
    protected = refuse_output(out, overwrite, model, inputs.from_dir)  # before minutes of work, not after
    check_protect_option(module, inputs)
    inputs = resolve_inputs(model, inputs, settings.retain_images)
    assert inputs.memorized is not None  # resolve_inputs refuses a missing --memorized
    memorized_list = read_prompts(inputs.protect or inputs.memorized)
    memorized = memorized_list.prompts
    if inputs.retain is not None:
        retain_prompts = read_prompts(inputs.retain).prompts
    else:
        assert settings.retain_images is not None  # resolve_inputs: --retain or --retain-images
        retain_prompts = read_image_captions(settings.retain_images, inputs.data_option)[1]
    notes = []
    if inputs.protect:  # the protected captions are *in* the data on purpose (selective learning)
        notes += module.check_protected(memorized, retain_prompts, inputs.retain is None, inputs.data_option)
    else:
        check_disjoint(memorized, retain_prompts)
    anchors = read_prompts(inputs.anchors).prompts if inputs.anchors else None
    notes += retain_count_notes(settings, len(retain_prompts))
    if anchors is not None:
        check_disjoint(memorized, anchors, "anchor")
        notes += anchor_notes(model, inputs.anchors)
    timer = Timer()
    with timer("load"):  # float32 whatever the source's dtype: Adam on half-precision weights loses small updates
        pipe = load_pipeline(inputs.from_dir or model, resolve_device(device), dtype or torch.float32)
    trainable_parameters(denoiser(pipe), settings.params or "kv")  # fail now on --params naming nothing
    with timer("retain_data"):
        if settings.retain_images:
            retain = image_retain_data(pipe, settings.retain_images, settings, inputs.data_option)
        else:
            retain = generated_retain_data(pipe, retain_prompts, settings)
    method_settings = method_settings if method_settings is not None else module.settings_from_options({})
    with timer("finetune"):
        result = module.train(pipe, settings, method_settings=method_settings, memorized_prompts=memorized,
                              retain=retain, anchor_prompts=anchors, memorized_images=memorized_list.images)
    delta, history, method_info = result.delta, result.history, result.info
    net = denoiser(pipe)
    params = dict(net.named_parameters())
    changes = {name: relative_change(params[name].detach().cpu(), value) for name, value in delta.items()}
    apply_delta(pipe, delta)
    info = {
        "source": str(model),
        "method": method,
        "kind": "finetune",
        "reference": module.METHOD.reference,
        "settings": _jsonable(settings),
        "method_settings": _jsonable(method_settings),
        "data": {"memorized": _file_record(inputs.memorized), "retain": _file_record(inputs.retain),
                 "protect": _file_record(inputs.protect), "retain_images": _folder_record(settings.retain_images),
                 "anchors": _file_record(inputs.anchors),
                 "retain_source": retain.source, "retain_count": len(retain.prompts)},
        "steps": settings.steps,
        "seconds": {**timer.seconds},
        "trained_parameters": settings.params,
        "changed_parameters": {name: value for name, value in changes.items() if value > 0},
        "relative_frobenius_change": changes,
        "final_losses": {k: float(v) for k, v in history.iloc[-1].items() if k.endswith("_loss")},
        "method_info": _jsonable(method_info),
        "notes": notes,
    }
    if started_from is not None:
        info["started_from"] = started_from  # the edit the delta was added to; "source" stays the base model
    with atomic_output_dir(out, overwrite, protected) as staging:
        with timer("save"):
            dtypes = save_dtypes(pipe, inputs.from_dir or model, save_dtype)  # the dtypes of what was loaded
            info["saved_dtypes"] = cast_components(pipe.to("cpu"), dtypes)
            pipe.save_pretrained(str(staging), safe_serialization=True)
            history.to_csv(staging / "loss.csv", index=False)
            write_prompts(retain.prompts, staging / "retain_prompts_used.csv")
        with timer("verify"):
            verified = verify_saved(staging, pipe)
        info["seconds"] = {**timer.seconds}
        (staging / PRUNE_INFO).write_text(json.dumps(info, indent=1))
        write_card(staging, info)
        write_run_json(staging, {"model": model, "method": method, "settings": settings,
                                 "method_settings": method_settings},
                       {"memorized": inputs.memorized, "retain": inputs.retain, "anchors": inputs.anchors,
                        "protect": inputs.protect},
                       timer.seconds)
    changed = info["changed_parameters"]
    largest = max(changes.values()) if changes else 0.0
    return (f"{method}: {settings.steps} steps on {len(retain.prompts)} retain {retain.source} latents "
            f"({timer.seconds['finetune']:.0f} s); changed {len(changed)} of {len(changes)} trained tensors "
            f"(--params {settings.params}, largest relative change {largest:.3g}); verified {verified} tensors "
            f"after reload.\n" + "".join(f"Note: {note}\n" for note in notes)
            + f"{describe(info['saved_dtypes'], save_dtype)} Trained in float32.\nFine-tuned pipeline: {out}")
