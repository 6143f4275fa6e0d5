"""`memprune prune`: zero a weight edit's selection and save the edited pipeline (stock diffusers loads it).

A locate-stage method's masks come from --masks (the folder `memprune locate` wrote); a prune-stage method (UniForget)
selects first, into its own masks folder, which is then applied the same way.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import methods
from ..errors import MemPruneError
from ..masks import MASKS_FILE, Masks
from ..methods.uniforget_relax import load_norm_channels, verify_norm_channels, zero_norm_channels
from ..model_card import write_card
from ..models import denoiser, load_pipeline, resolve_device
from ..precision import cast_components, describe, save_dtypes, saved_dtypes
from ..prune import apply_masks, prune_info, save_pruned, verify_pruned
from .defaults import model_or_default
from .output import Timer, atomic_output_dir, check_output_dir, refuse_output, write_run_json
from .robust import robust_to_folder
from .uniforget import uniforget_to_folder


def _uniforget_stage(model, options, masks_out, settings, **kwargs) -> str:
    return uniforget_to_folder(model, options["neutral"], masks_out, settings, memorized=options["memorized"],
                               **kwargs)


# The prune-stage methods' commands: each selects into a masks folder and returns its summary.
PRUNE_STAGES: dict[str, Callable[..., str]] = {"uniforget": _uniforget_stage, "robust-wanda": robust_to_folder}


def run(options: dict[str, Any], echo: Callable[[str], Any] = print) -> None:
    """`memprune prune` with the CLI's options; `echo` prints each summary as it is ready."""
    model = model_or_default(options["model"])
    out, overwrite, masks_folder = options["out"], options["overwrite"], options["masks_folder"]
    module = methods.get(options["method"], "weight_edit")
    if module.METHOD.stage == "prune":
        if module.METHOD.name not in PRUNE_STAGES:
            raise MemPruneError(f"--method {module.METHOD.name} selects at prune time but has no prune command yet.")
        masks_out = options["masks_out"] or f"{str(out).rstrip('/')}-{module.METHOD.name}-masks"
        check_output_dir(out, overwrite)  # fail before minutes of training, not after
        stage = PRUNE_STAGES[module.METHOD.name]
        echo(stage(model, options, masks_out, module.settings_from_options(options),
                   wanda_masks=masks_folder, overwrite=overwrite, device=options["device"]))
        masks_folder = masks_out
    elif masks_folder is None:
        raise MemPruneError(f"--masks is required with --method {module.METHOD.name}: give the output folder of "
                            "`memprune locate`.")
    echo(prune_to_folder(model, masks_folder, out, timesteps=options["timesteps"], overwrite=overwrite,
                         device=options["device"], dtype=options.get("dtype") or "keep"))


def prune_to_folder(model: str, masks_folder, out, timesteps: int = 10, overwrite: bool = False,
                    device: str = "auto", dtype: str = "keep") -> str:
    """The `memprune prune` command as a function: load a fresh copy, zero, save atomically (in the source's dtypes
    unless `dtype` names one), reload and verify."""
    protected = refuse_output(out, overwrite, model)
    masks = Masks.load(masks_folder)
    norm_channels = load_norm_channels(masks_folder)  # UniForget's pruned normalisation channels, if any
    timer = Timer()
    # Zeroing is exact in any dtype: load a source saved in one dtype in that dtype, not upcast to float32 (an SDXL
    # fp16 source would take 14 GB instead of 7).
    source_dtypes = set(saved_dtypes(model).values())
    load_dtype = source_dtypes.pop() if len(source_dtypes) == 1 else None
    with timer("load"):
        pipe = load_pipeline(model, resolve_device(device), load_dtype)
    with timer("prune"):
        result = apply_masks(pipe, masks, timesteps)
        norms_zeroed = zero_norm_channels(denoiser(pipe), norm_channels) if norm_channels else {}
    with atomic_output_dir(out, overwrite, protected) as staging:
        info = prune_info(model, masks_folder, result, masks)
        if norm_channels is not None:  # the edit also changed norm weights: say so
            info["norm_channels_zeroed"] = norms_zeroed
            info["norm_edit"] = "weight and bias of each pruned normalisation channel set to zero"
        with timer("save"):
            saved = cast_components(pipe.to("cpu"), save_dtypes(pipe, model, dtype))
            save_pruned(pipe, staging, info)
            write_card(staging, info)
        del pipe  # not held while the saved copy is reloaded
        with timer("verify"):
            verified = verify_pruned(staging, masks, timesteps, load_dtype)
            if norm_channels:
                reloaded = load_pipeline(str(staging), resolve_device("cpu"), load_dtype)
                verified += verify_norm_channels(denoiser(reloaded), norm_channels)
                del reloaded
        write_run_json(staging, {"model": model, "masks": str(masks_folder), "timesteps": timesteps,
                                  "dtype": dtype},
                       {"masks": Path(masks_folder) / MASKS_FILE}, timer.seconds, zeroed_weights=result.zeroed,
                       saved_dtypes=saved)
    total = sum(masks.shapes[layer][0] * masks.shapes[layer][1] for layer in result.zeroed)
    return (
        f"Zeroed {result.total_zeroed} weights ({result.total_zeroed / max(total, 1):.3%} of the masked layers' "
        "weights) "
        f"in {len(result.zeroed)} layers, steps 0..{timesteps - 1}"
        + (f", and {sum(norms_zeroed.values())} normalisation channels (weight and bias) in {len(norms_zeroed)} "
           "layers" if norms_zeroed else "")
        + f"; verified {verified} zeros after reload.\n"
        f"{describe(saved, dtype)}\n"
        f"Edited pipeline: {out}"
    )
