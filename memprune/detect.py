"""Wen et al. (ICLR 2024) memorization detection: the text-conditional noise norm along the sampling path.

    d = mean over steps t of ‖ε(x_t, c) − ε(x_t, ∅)‖₂     (norm over C, H, W of one sample)

With classifier-free guidance diffusers batches the denoiser input as [unconditional, conditional], so a
forward hook on the denoiser reads both predictions from the output the pipeline computes anyway: no
extra denoiser passes. `score_first_step` is the same norm at the first (noisiest) step only, which Wen
et al. found already separates memorized prompts. ε is the denoiser's output converted to an ε-prediction through
the scheduler's prediction_type (memprune.prediction): on SD 1.x, an ε-model, it is the output itself, as theirs. On
a v-model with zero terminal SNR ε at the first step is x_T whatever the prompt, so the first-step score is 0 there
(the mean over steps is not).

Labels of a prompt file (column type, label or group; or a memorized / is_memorized column) are read
case-insensitively: memorized, memorised, mem, m, VM (verbatim), TM (template), 1, true, yes are
*memorized* (positive); non_memorized, non-memorized, not memorized, nonmem, nm, N, 0, false, no,
general, control are *non-memorized*. Anything else is refused with the line that holds it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .conditioning import text_noise_norm
from .errors import MemPruneError
from .generate import Call, GenerationSettings, call_plan, generate, uses_cfg
from .prediction import call_inputs, to_epsilon
from .prompts import PromptList
from .trace import Trace

POSITIVE_LABELS = {"memorized", "memorised", "mem", "m", "vm", "tm", "1", "true", "yes", "y", "positive"}
NEGATIVE_LABELS = {"non_memorized", "nonmemorized", "non_memorised", "not_memorized", "not_memorised", "unmemorized",
                   "nonmem", "non_mem", "nm", "n", "0", "false", "no", "negative", "general", "control"}
LABEL_EXTRA_COLUMNS = ("memorized", "is_memorized", "memorised")


class NoiseNormRecorder(Trace):
    """Trace: a forward hook on the denoiser collects ‖ε_cond − ε_uncond‖₂ per sample and step, ε converted from the
    output through `scheduler` (memprune.prediction.to_epsilon at the call's own input and timestep).

    Call `new_generation(batch_size)` before each pipeline call; `scores()` then returns a (steps, batch)
    tensor for that call. It removes exactly its own hook on exit, also after an exception.
    """

    def __init__(self, denoiser: nn.Module, scheduler=None):
        super().__init__(denoiser, edit_output=self._record, retain_input=True)
        self.denoiser, self.scheduler = denoiser, scheduler
        self.expected: int | None = None
        self._steps: list[torch.Tensor] = []

    def new_generation(self, batch_size: int | None = None) -> None:
        self.expected = batch_size
        self._steps = []

    def _record(self, output, name: str) -> None:
        eps = output
        if hasattr(output, "sample"):
            eps = output.sample
        elif isinstance(output, (tuple, list)):
            eps = output[0]
        batch = eps.shape[0]
        if batch % 2 or (self.expected is not None and batch != 2 * self.expected):
            raise MemPruneError(
                f"The denoiser was called with a batch of {batch} for {self.expected} prompts: "
                "the detection score needs "
                "the classifier-free guidance batch [unconditional, conditional] in one call."
            )
        if self.scheduler is not None:
            args, kwargs = self.input[name]
            sample, timestep = call_inputs(args, kwargs)
            eps = to_epsilon(eps.detach(), sample, timestep, self.scheduler)
        self._steps.append(text_noise_norm(eps.detach()).cpu())

    def scores(self) -> torch.Tensor:
        if not self._steps:
            return torch.zeros(0, self.expected or 0)
        return torch.stack(self._steps)


def require_cfg(pipe, settings: GenerationSettings) -> None:
    from .generate import guidance_distilled

    if guidance_distilled(pipe):
        raise MemPruneError(f"The detection score needs classifier-free guidance, and {type(pipe).__name__} is "
                            "guidance-distilled (no unconditional prediction): it cannot be scored.")
    if not uses_cfg(pipe, settings):
        raise MemPruneError("The detection score needs classifier-free guidance: use a guidance scale above 1.")


def generate_with_scores(pipe, prompts: list[str], settings: GenerationSettings, output_type: str = "latent",
                         progress: bool = True, desc: str = "generating", calls: list[Call] | None = None,
                         before_call=None):
    """generate() with the Wen score recorded: yield (prompt_index, seed, image, per-step scores or None).

    Per-step scores are a float64 array of length steps; they are None without classifier-free guidance. `calls`
    (default: all of call_plan) runs only those pipeline calls, as generate() does; `before_call()` runs before each.
    """
    from .models import denoiser

    cfg = uses_cfg(pipe, settings)
    calls = call_plan(prompts, settings) if calls is None else calls
    recorder = NoiseNormRecorder(denoiser(pipe), pipe.scheduler)
    sizes = iter([len(call.prompts) for call in calls])

    def before_recorded_call():
        if before_call is not None:
            before_call()
        recorder.new_generation(next(sizes))

    if not cfg:
        for index, seed, image in generate(pipe, prompts, settings, output_type=output_type, progress=progress,
                                           desc=desc, calls=calls, before_call=before_call):
            yield index, seed, image, None
        return
    with recorder:
        for index, seed, image in generate(pipe, prompts, settings, output_type=output_type,
                                           before_call=before_recorded_call, progress=progress, desc=desc, calls=calls):
            # generate() yields a call's items right after that call (batches start at multiples of batch_size),
            # before the next before_call(): the recorder holds this call's scores.
            per_step = recorder.scores()[:, index % settings.batch_size].double().numpy()
            yield index, seed, image, per_step


def summarize_steps(per_step: np.ndarray) -> tuple[float, float]:
    """(mean over all steps, first step) of one generation's per-step noise norms."""
    return float(np.mean(per_step)), float(per_step[0])


# --------------------------------------------------------------------------------------------- labels

def _normalise_label(value: str) -> str:
    return re.sub(r"[\s\-]+", "_", str(value).strip().lower())


def parse_label(value, where: str = "") -> int:
    """1 for a memorized label, 0 for a non-memorized one (see the module docstring); refuse anything else."""
    key = _normalise_label(value)
    if key in POSITIVE_LABELS:
        return 1
    if key in NEGATIVE_LABELS:
        return 0
    raise MemPruneError(
        f"Label '{value}'{where} is neither memorized (memorized, VM, TM, 1, true) nor non-memorized "
        "(non_memorized, N, 0, false): fix the label column."
    )


def prompt_labels(prompts: PromptList) -> tuple[np.ndarray, list[str]] | None:
    """Binary labels (1 = memorized) and the raw values, from the label column if the file has one."""
    raw = prompts.labels
    if raw is None:
        column = next((c for c in LABEL_EXTRA_COLUMNS if c in prompts.extra), None)
        if column is None:
            return None
        raw = ["" if v is None else str(v) for v in prompts.extra[column]]
    where = lambda i: f" of prompt {i + 1} ('{prompts.prompts[i][:40]}') in '{prompts.source}'"  # noqa: E731
    labels = np.array([parse_label(value, where(i)) for i, value in enumerate(raw)], dtype=int)
    return labels, list(raw)


def roc_summary(labels, scores) -> dict:
    """ROC AUC and TPR at 1% FPR (the largest TPR on the ROC curve with FPR ≤ 0.01), memorized = positive."""
    from sklearn.metrics import roc_auc_score, roc_curve

    labels, scores = np.asarray(labels, dtype=int), np.asarray(scores, dtype=float)
    positives, negatives = int(labels.sum()), int((1 - labels).sum())
    result: dict[str, Any] = {"positives": positives, "negatives": negatives, "auc": None, "tpr_at_1pct_fpr": None}
    if positives == 0 or negatives == 0:
        result["note"] = "ROC needs both memorized and non-memorized prompts"
        return result
    fpr, tpr, _ = roc_curve(labels, scores)
    result["auc"] = float(roc_auc_score(labels, scores))
    result["tpr_at_1pct_fpr"] = float(tpr[fpr <= 0.01].max())
    return result


# --------------------------------------------------------------------------------------------- detect

@dataclass
class DetectSettings:
    model: str
    prompts: str
    generation: GenerationSettings = field(default_factory=lambda: GenerationSettings(steps=50, seeds=1))

    def __post_init__(self):
        if self.generation.steps < 1 or self.generation.seeds < 1:
            raise MemPruneError("--steps and --seeds must be at least 1.")
        if self.generation.batch_size < 1:
            raise MemPruneError("--batch-size must be at least 1.")


@dataclass
class DetectionResult:
    scores: pd.DataFrame  # one row per prompt: caption, [label, memorized], detection_score, detection_score_first_step
    per_generation: pd.DataFrame  # one row per prompt and seed
    roc: dict[str, dict] = field(default_factory=dict)  # per score column: auc, tpr_at_1pct_fpr, counts


def detection_scores(pipe, prompts: list[str], generation: GenerationSettings, progress: bool = True,
                     desc: str = "detect") -> pd.DataFrame:
    """Per prompt and seed: Wen's score (mean over steps) and its first-step value; latents only, no VAE decode."""
    require_cfg(pipe, generation)
    rows = []
    for index, seed, _, per_step in generate_with_scores(pipe, prompts, generation, "latent", progress, desc):
        mean, first = summarize_steps(per_step)
        rows.append({"prompt_index": index, "seed": seed, "detection_score": mean, "detection_score_first_step": first,
                     "steps_recorded": len(per_step)})
    return pd.DataFrame(rows).sort_values(["prompt_index", "seed"], ignore_index=True)


def detect(pipe, prompts: PromptList, generation: GenerationSettings, progress: bool = True) -> DetectionResult:
    """Score every prompt (mean over seeds); with labels, ROC AUC and TPR at 1% FPR of both scores."""
    labelled = prompt_labels(prompts)
    per_generation = detection_scores(pipe, prompts.prompts, generation, progress)
    table = per_generation.groupby("prompt_index")[["detection_score", "detection_score_first_step"]].mean()
    scores = pd.DataFrame({"prompt_index": range(len(prompts)), "caption": prompts.prompts})
    if labelled is not None:
        scores["label"] = labelled[1]
        scores["memorized"] = labelled[0]
    scores = scores.join(table, on="prompt_index")
    scores["seeds"] = generation.seeds
    result = DetectionResult(scores=scores, per_generation=per_generation)
    if labelled is not None:
        result.roc = {column: roc_summary(labelled[0], scores[column])
                      for column in ("detection_score", "detection_score_first_step")}
    return result
