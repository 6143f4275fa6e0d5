"""``--mitigation wen``: the unedited model wrapped by Wen et al.'s inference-time mitigation, as one more column.

It is generated on the same seeds and timed like the others, so its seconds_per_image_ratio is the mitigation's
cost per image in this run. Its target noise norm (``--wen-target``; default: the median first-step noise norm of
the unedited model on the threshold's calibration group, computed before generation), the mean AdamW iterations per
image and the share of images that reached the target are the metrics ``mitigation_target``,
``mitigation_iterations`` and ``mitigation_target_reached`` of that column.
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
    from ..conditioning import asked_size
    from ..methods.wen import calibrate_target

    assert settings.mitigation is not None  # called only with --mitigation
    module = get(settings.mitigation, "mitigation")
    generation = settings.generation
    if not uses_cfg(pipe, generation):
        raise MemPruneError(f"--mitigation {settings.mitigation} needs classifier-free guidance: use a guidance scale "
                            "above 1.")
    wen = settings.wen_settings()
    if wen.target is None:
        calibration = calibration_group(groups)
        prompts = [sources[source].prompts[i] for source, i in groups[calibration].members]
        seeds = list(range(generation.seed, generation.seed + generation.seeds))
        size = asked_size(pipe, generation.height, generation.width)
        target = calibrate_target(pipe, prompts, generation.steps, seeds, guidance_scale(pipe, generation), size=size)
        wen = replace(wen, target=target)
        notes.append(f"Wen mitigation target noise norm {wen.target:.4g}: median first-step noise norm of the unedited "
                     f"model on the {len(prompts)} {calibration} prompts x {len(seeds)} seeds (lr {wen.lr:g}, at most "
                     f"{wen.max_iterations} iterations).")
    else:
        notes.append(f"Wen mitigation target noise norm {wen.target:.4g} (given; lr {wen.lr:g}, at most "
                     f"{wen.max_iterations} iterations).")
    log(notes[-1])
    return {settings.mitigation: module.wrap(pipe, wen)}


def add_mitigation_metrics(metrics: pd.DataFrame, seeds: int, mitigated: dict[str, Any],
                           records: dict[tuple[str, str], list], groups: dict[str, Group],
                           models: list[str]) -> pd.DataFrame:
    """Per group: the target, the mean AdamW iterations per image and the share of images that reached the target.

    Records come in generate()'s order: seeds outer, prompts inner (batches keep the prompt order).
    """
    rows = []
    for model, wrapped in mitigated.items():
        per_source = {}
        for (name, source), items in records.items():
            if name == model:
                count = len(items) // seeds
                iterations = np.array([r.iterations for r in items], dtype=float).reshape(seeds, count).T
                reached = np.array([r.reached for r in items], dtype=float).reshape(seeds, count).T
                per_source[source] = (iterations, reached)
        for name, group in groups.items():
            rows.append((model, name, "mitigation_target", float(wrapped.settings.target)))
            rows.append((model, name, "mitigation_iterations",
                         float(np.mean([per_source[s][0][i] for s, i in group.members]))))
            rows.append((model, name, "mitigation_target_reached",
                         float(np.mean([per_source[s][1][i] for s, i in group.members]))))
    metrics = pd.concat([metrics, pd.DataFrame(rows, columns=metrics.columns)], ignore_index=True)
    return sort_metrics(metrics, models)
