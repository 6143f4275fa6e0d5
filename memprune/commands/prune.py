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
from ..model_card import write_card
from ..models import load_pipeline, resolve_device
from ..prune import apply_masks, prune_info, save_pruned, verify_pruned
from .defaults import model_or_default
from .output import Timer, atomic_output_dir, check_output_dir, refuse_output, write_run_json
from .robust import robust_to_folder
from .uniforget import uniforget_to_folder


def _uniforget_stage(model, options, masks_out, settings, **kwargs) -> str:
    return uniforget_to_folder(model, options["neutral"], masks_out, settings, **kwargs)


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
                         device=options["device"]))


def prune_to_folder(model: str, masks_folder, out, timesteps: int = 10, overwrite: bool = False,
                    device: str = "auto") -> str:
    """The `memprune prune` command as a function: load a fresh copy, zero, save atomically, reload and verify."""
    protected = refuse_output(out, overwrite, model)
    masks = Masks.load(masks_folder)
    timer = Timer()
    with timer("load"):
        pipe = load_pipeline(model, resolve_device(device))
    with timer("prune"):
        result = apply_masks(pipe, masks, timesteps)
    with atomic_output_dir(out, overwrite, protected) as staging:
        info = prune_info(model, masks_folder, result, masks)
        with timer("save"):
            save_pruned(pipe.to("cpu"), staging, info)
            write_card(staging, info)
        with timer("verify"):
            verified = verify_pruned(staging, masks, timesteps)
        write_run_json(staging, {"model": model, "masks": str(masks_folder), "timesteps": timesteps},
                       {"masks": Path(masks_folder) / MASKS_FILE}, timer.seconds, zeroed_weights=result.zeroed)
    total = sum(masks.shapes[layer][0] * masks.shapes[layer][1] for layer in result.zeroed)
    return (
        f"Zeroed {result.total_zeroed} weights ({result.total_zeroed / total:.3%} of the masked layers' weights) "
        f"in {len(result.zeroed)} layers, steps 0..{timesteps - 1}; verified {verified} zeros after reload.\n"
        f"Edited pipeline: {out}"
    )
