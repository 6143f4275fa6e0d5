"""``--mitigation``: the unedited model wrapped by a generation-time mitigation, as one more column.

It is generated on the same seeds and timed like the others, so its seconds_per_image_ratio is the mitigation's
cost per image in this run.

- ``wen`` (Wen et al.): its target (``--wen-target``; default: calibrated on the unedited model's threshold
  calibration group before generation, in the loss's units: memprune.methods.wen.calibrate_target), the mean AdamW
  iterations per image and the share of images that reached the target are the metrics ``mitigation_target``,
  ``mitigation_iterations`` and ``mitigation_target_reached`` of that column. In per-prompt mode (the default) each
  prompt's embedding is optimised on the x_T of all evaluation seeds and shared by its images.
- ``nemo_prompt`` (NeMo's own scenario): each prompt generated with its own refined neurons from ``--nemo-neurons``
  (a ``locate --method nemo`` folder) deactivated; ``mitigation_neurons`` is the mean number blocked per image. Scored
  on the memorized prompts themselves (the union scenario is ``prune`` of the same folder, on held-out prompts).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from ..errors import MemPruneError
from ..generate import guidance_scale, uses_cfg
from ..methods import get
from ..prompts import PromptList
from .inputs import Group, calibration_group
from .schema import sort_metrics
from .settings import EvaluateSettings


def mitigation_pipes(settings: EvaluateSettings, pipe, sources: dict[str, PromptList], groups: dict[str, Group],
                     notes: list[str], log: Callable[[str], None]) -> dict[str, Any]:
    """{name: wrapped unedited pipeline} of the --mitigation; Wen's target is calibrated here when not given."""
    assert settings.mitigation is not None  # called only with --mitigation
    module = get(settings.mitigation, "mitigation")
    if settings.mitigation == "nemo_prompt":
        return {settings.mitigation: _nemo_prompt(module, settings, pipe, notes, log)}
    if settings.mitigation != "wen":  # a mitigation registered from outside: its own settings are its business
        return {settings.mitigation: module.wrap(pipe, None)}
    return {settings.mitigation: _wen(module, settings, pipe, sources, groups, notes, log)}


def _nemo_prompt(module, settings: EvaluateSettings, pipe, notes: list[str], log: Callable[[str], None]):
    if settings.nemo_neurons is None:
        raise MemPruneError("--mitigation nemo_prompt needs --nemo-neurons FOLDER (the output of "
                            "`memprune locate --method nemo`).")
    nemo = module.NeMoPromptSettings.from_folder(settings.nemo_neurons)
    located = sum(1 for neurons in nemo.neurons.values() if neurons)
    notes.append(f"NeMo per-prompt mitigation: each prompt generated with its own neurons from '{nemo.source}' "
                 f"deactivated ({located} of {len(nemo.neurons)} located prompts have neurons; other prompts are "
                 "generated unchanged).")
    log(notes[-1])
    return module.wrap(pipe, nemo)


def _wen(module, settings: EvaluateSettings, pipe, sources, groups, notes: list[str], log: Callable[[str], None]):
    from ..conditioning import asked_size
    from ..methods.wen import calibrate_target

    generation = settings.generation
    if not uses_cfg(pipe, generation):
        raise MemPruneError(f"--mitigation {settings.mitigation} needs classifier-free guidance: use a guidance scale "
                            "above 1.")
    wen = settings.wen_settings()
    seeds = list(range(generation.seed, generation.seed + generation.seeds))
    units = (f"{wen.mode} mode: joint norm over {len(seeds)} seeds per prompt" if wen.mode == "prompt"
             else f"{wen.mode} mode: per-image norm")
    if wen.target is None:
        calibration = calibration_group(groups)
        prompts = [sources[source].prompts[i] for source, i in groups[calibration].members]
        size = asked_size(pipe, generation.height, generation.width)
        target = calibrate_target(pipe, prompts, generation.steps, seeds, guidance_scale(pipe, generation),
                                  mode=wen.mode, size=size)
        wen = replace(wen, target=target)
        notes.append(f"Wen mitigation target {wen.target:.4g} ({units}): median first-step value "
                     f"of the unedited model on the {len(prompts)} {calibration} prompts x {len(seeds)} seeds (lr "
                     f"{wen.lr:g}, at most {wen.max_iterations} iterations).")
    else:
        notes.append(f"Wen mitigation target {wen.target:.4g} ({units}; given; lr {wen.lr:g}, at "
                     f"most {wen.max_iterations} iterations).")
    log(notes[-1])
    return module.wrap(pipe, wen, seeds=seeds)


def add_mitigation_metrics(metrics: pd.DataFrame, seeds: int, mitigated: dict[str, Any],
                           records: dict[tuple[str, str], list], groups: dict[str, Group],
                           models: list[str]) -> pd.DataFrame:
    """Per group: the mitigation's constant settings (Wen: its target) and the mean of each per-image record metric
    (Wen: AdamW iterations and target reached; NeMo per prompt: neurons blocked).

    Records come in generate()'s order: seeds outer, prompts inner (batches keep the prompt order).
    """
    rows = []
    for model, wrapped in mitigated.items():
        per_source: dict[str, dict[str, np.ndarray]] = {}
        for (name, source), items in records.items():
            if name == model and items and hasattr(items[0], "metrics"):
                count = len(items) // seeds
                values = [item.metrics() for item in items]
                per_source[source] = {key: np.array([v[key] for v in values], dtype=float).reshape(seeds, count).T
                                      for key in values[0]}
        target = getattr(getattr(wrapped, "settings", None), "target", None)
        keys = list(next(iter(per_source.values()), {}))
        for name, group in groups.items():
            if target is not None:
                rows.append((model, name, "mitigation_target", float(target)))
            for key in keys:
                rows.append((model, name, key, float(np.mean([per_source[s][key][i] for s, i in group.members]))))
    metrics = pd.concat([metrics, pd.DataFrame(rows, columns=metrics.columns)], ignore_index=True)
    return sort_metrics(metrics, models)
