"""UniForget's prune stage (`memprune prune --method uniforget`): train the gates on neutral prompts and write the
masks folder (masks, gates, loss.csv, pruned_share.csv, run.json) that the prune then applies."""
from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path

from ..errors import MemPruneError
from ..masks import MASKS_FILE, Masks
from ..methods.uniforget import UniForgetSettings, check_neutral, save_gate_result, train_gates, union_masks
from ..models import denoiser, layer_shapes, load_pipeline, model_identity, resolve_device
from ..prompts import read_prompts
from .defaults import testbed_file
from .output import Timer, atomic_output_dir, refuse_output, write_run_json


def _existing_testbed_file(model: str, role: str) -> str | None:
    """The testbed's file for `role` when `model` is a testbed and the file is there.

    UniForget's neutral prompts default to general_train.csv, never the held-out general captions: `memprune
    evaluate` measures utility on those, and gates trained to preserve exactly them would flatter its utility."""
    path = testbed_file(model, role)
    return path if path is not None and Path(path).is_file() else None


def uniforget_to_folder(model: str, neutral: str | None, out, settings: UniForgetSettings | None = None,
                        memorized: str | None = None, wanda_masks: str | None = None, overwrite: bool = False,
                        device: str = "auto", dtype=None) -> str:
    """Train gates on a neutral prompt file and write a masks folder that `memprune prune --masks` applies.

    `neutral`: a prompt file of non-memorized captions (default on the testbed: its general_train.csv).
    `memorized`: memorized prompts that must not be among the neutral ones (default on the testbed: its
    memorized.csv); when the memorized prompts are also the testbed's, the defaults can never overlap.
    `wanda_masks`: a `memprune locate` folder whose masks are united with the UniForget mask.
    Returns a summary.
    """
    settings = settings or UniForgetSettings()
    protected = refuse_output(out, overwrite, model)
    neutral = neutral or _existing_testbed_file(model, "general_train")
    if neutral is None:
        raise MemPruneError("UniForget needs neutral (non-memorized) prompts: give --neutral FILE.")
    neutral_prompts = read_prompts(neutral).prompts
    memorized = memorized or _existing_testbed_file(model, "memorized")
    memorized_prompts = read_prompts(memorized).prompts if memorized else None
    check_neutral(neutral_prompts, memorized_prompts)
    wanda = Masks.load(wanda_masks) if wanda_masks else None
    timer = Timer()
    with timer("load"):
        pipe = load_pipeline(model, resolve_device(device), dtype)
    net = denoiser(pipe)
    identity = model_identity(model, pipe)
    identity["layer_shapes"] = layer_shapes(net)
    if wanda is not None:
        wanda.check_compatible(layer_shapes(net))
        if len(wanda.steps) != settings.steps:
            settings = UniForgetSettings(**{**asdict(settings), "steps": len(wanda.steps)})
    with timer("train"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unchecked-prompts warning: the summary says it instead
        result = train_gates(pipe, neutral_prompts, settings, memorized_prompts, meta={"model": identity})
    if wanda is not None:
        result.masks = union_masks(result.masks, wanda)
        result.masks.meta["model"] = identity
    with atomic_output_dir(out, overwrite, protected) as staging:
        save_gate_result(result, staging)
        write_run_json(staging, settings, {"neutral": neutral, "memorized": memorized,
                                           "wanda_masks": Path(wanda_masks) / MASKS_FILE if wanda_masks else None},
                       timer.seconds, model=identity, pruned_share=result.pruned_share)
    final = result.history.iloc[-1]
    penalty = result.history.columns[3]  # expected_l0 (hard-concrete) or mask_mean (sigmoid)
    table = result.pruned if "kind" in result.pruned else result.pruned.assign(kind="ffn")
    pruned = table.groupby("kind", sort=False)[["pruned", "hidden"]].sum()
    units = {"ffn": "FeedForward neurons", "norm": "normalisation channels"}
    counts = ", ".join(f"{int(row.pruned)} of {int(row.hidden)} {units[kind]}" for kind, row in pruned.iterrows())
    lines = [
        f"UniForget ({settings.gates} masks, beta={settings.beta:g}, {settings.train_steps} steps, "
        f"{len(neutral_prompts)} neutral prompts): pruned {counts} ({result.pruned_share:.2%} of the masked units); "
        f"final latent MSE {final['mse']:.4g}, {penalty.replace('_', ' ')} {final[penalty]:.3f}.",
        "Neutral prompts checked against " + (f"{len(memorized_prompts)} memorized prompts ({memorized})."
                                               if memorized_prompts else "no memorized prompts (none given)."),
    ]
    if wanda is not None:
        lines.append(f"United with the Wanda masks of {wanda_masks}.")
    lines.append(f"Masks: {Path(out) / 'masks.safetensors'} (apply with `memprune prune --masks {out}`)")
    return "\n".join(lines)
