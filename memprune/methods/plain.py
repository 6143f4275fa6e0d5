"""Plain fine-tuning: the step-matched control of the fine-tuning methods.

The shared loop of `memprune.finetune` with no hook: the same retain data, parameters (--params), steps,
learning rate, batch and seed as gradient projection and DoCo, the standard diffusion loss, no projection and
no unlearning term. Whatever it changes in memorized generations is what fine-tuning on retain data does by
itself. What a method changes beyond it is what the method adds. The memorized captions are used only to refuse
retain captions that repeat them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MemPruneError
from ..finetune import FinetuneHooks, FinetuneResult, FinetuneSettings, RetainData, run_finetune
from .base import MethodInfo

METHOD = MethodInfo(
    name="plain", kind="finetune",
    summary="Control: fine-tune on the same retain data and steps with no projection and no unlearning term.",
    reference="step-matched control of the fine-tuning methods (no paper)",
)


@dataclass
class PlainSettings:
    """Plain fine-tuning has no settings of its own (FinetuneSettings holds the shared ones)."""


def default_settings() -> PlainSettings:
    return PlainSettings()


def settings_from_options(options: dict) -> PlainSettings:
    """Plain fine-tuning takes no option of its own; refuses --anchors, which only DoCo uses."""
    if options.get("anchors") is not None:
        raise MemPruneError("--anchors is used by --method doco only.")
    return default_settings()


def train(pipe, settings: FinetuneSettings, method_settings: PlainSettings | None = None,
          retain: RetainData | None = None, **_) -> FinetuneResult:
    if retain is None:
        raise MemPruneError("Plain fine-tuning needs retain data to fine-tune on.")
    delta, history = run_finetune(pipe, settings, retain, FinetuneHooks(), desc="plain fine-tune")
    return FinetuneResult(delta=delta, history=history, info={})


def finetune(pipe, settings: FinetuneSettings, **inputs) -> dict[str, torch.Tensor]:
    """The finetune entry point: the weight delta (the pipeline is left unchanged)."""
    return train(pipe, settings, **inputs).delta
