"""NeMo's own evaluation scenario as a generation-time mitigation: each memorized prompt generated with *its own*
refined neurons blocked (``memprune evaluate --mitigation nemo_prompt --nemo-neurons LOCATED``).

Hintersdorf et al. (their ``4_generate_images.py``) localise neurons per memorized prompt and generate that prompt
with exactly those neurons deactivated; they never prune one model for all prompts. memprune's weight edit
(``locate --method nemo`` then ``prune``) is the other scenario, the *union* of every prompt's neurons zeroed in one
model, scored on held-out prompts — a generalisation NeMo does not claim. This module is the per-prompt one, scored
on the memorized prompts themselves:

- the neurons of a prompt are those ``locate --method nemo`` stored for it (masks.json, ``nemo.prompts[i].neurons``:
  value-layer name -> rows), looked up by the prompt's exact text; a prompt without neurons (not memorized by the
  criterion, or not among the located prompts: every non-memorized prompt) is generated unchanged;
- blocking is NeMo's deactivation (memprune.methods.nemo_criterion.Deactivated: the neuron's output set to what a
  zeroed weight row gives) on every denoiser call of that prompt's generation, both halves of the
  classifier-free-guidance batch (their hook sits on the whole ``to_v`` output);
- prompts of one pipeline call that share a neuron set (e.g. all prompts without neurons) run in one call; the
  others run one call each, so no image sees another prompt's neurons. Each image keeps its own generator.

No weight changes. ``records`` holds, per generated image, the number of neurons blocked (metric
``mitigation_neurons`` of evaluate).
"""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import MemPruneError
from .base import MethodInfo
from .nemo_search import Neurons, count

METHOD = MethodInfo(
    "nemo_prompt", "mitigation",
    "NeMo's evaluation scenario: each memorized prompt generated with its own refined cross-attention value neurons "
    "deactivated (from a `locate --method nemo` folder)",
    "Hintersdorf et al., NeurIPS 2024, Finding NeMo: Localizing Neurons Responsible For Memorization in Diffusion "
    "Models",
)


@dataclass
class NeMoPromptSettings:
    neurons: dict[str, Neurons] = field(default_factory=dict)  # prompt text -> its neurons (layer -> rows)
    source: str = ""  # the located folder they came from

    @classmethod
    def from_folder(cls, folder: str | Path) -> NeMoPromptSettings:
        """The per-prompt neurons a `locate --method nemo` run stored in FOLDER/masks.json."""
        path = Path(folder) / "masks.json"
        if not path.is_file():
            raise MemPruneError(f"--nemo-neurons '{folder}' holds no masks.json: give the output folder of "
                                "`memprune locate --method nemo`.")
        try:
            prompts = json.loads(path.read_text())["nemo"]["prompts"]
        except (ValueError, KeyError, TypeError) as error:
            raise MemPruneError(f"'{path}' has no per-prompt NeMo neurons (nemo.prompts): was it written by "
                                f"`memprune locate --method nemo`? ({error})") from None
        neurons = {entry["prompt"]: {layer: [int(r) for r in rows] for layer, rows in entry["neurons"].items() if rows}
                   for entry in prompts}
        return cls(neurons=neurons, source=str(folder))


@dataclass
class NeMoPromptRecord:
    prompt: str
    neurons: int  # neurons blocked for this image (its prompt's)

    def metrics(self) -> dict[str, float]:
        return {"mitigation_neurons": float(self.neurons)}


def _concatenated(parts: list):
    """The `images` of several pipeline outputs as one batch (tensors, arrays or lists of PIL images)."""
    if torch.is_tensor(parts[0]):
        return torch.cat(parts)
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    return [image for part in parts for image in part]


class NeMoPromptPipeline:
    """A diffusers pipeline generating each prompt with its own NeMo neurons deactivated (module docstring)."""

    def __init__(self, pipe, settings: NeMoPromptSettings):
        from ..models import denoiser, value_linears

        linears = value_linears(denoiser(pipe))
        unknown = sorted({layer for neurons in settings.neurons.values() for layer in neurons} - set(linears))
        if unknown:
            raise MemPruneError(f"NeMo neurons name layer '{unknown[0]}', which this model's denoiser does not have: "
                                "give the `locate --method nemo` folder of this model.")
        self.__dict__.update(pipe=pipe, settings=settings, linears=linears, records=[])

    def __getattr__(self, name):
        return getattr(self.__dict__["pipe"], name)

    def neurons_of(self, prompt: str) -> Neurons:
        return self.settings.neurons.get(prompt, {})

    def _call(self, prompt=None, generator=None, **kwargs):
        from .nemo_criterion import Deactivated

        if prompt is None or "prompt_embeds" in kwargs:
            raise MemPruneError("NeMo's per-prompt mitigation looks neurons up by prompt text: pass prompt text.")
        if kwargs.get("num_images_per_prompt", 1) != 1:
            raise MemPruneError("NeMo's per-prompt mitigation generates one image per prompt entry: use "
                                "num_images_per_prompt 1 (repeat the prompt instead).")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        generators = generator if isinstance(generator, list) else [generator] * len(prompts)
        runs: list[tuple[Neurons, list[int]]] = []  # consecutive prompts sharing a neuron set run in one call
        for row, text in enumerate(prompts):
            neurons = self.neurons_of(text)
            if runs and runs[-1][0] == neurons:
                runs[-1][1].append(row)
            else:
                runs.append((neurons, [row]))
        outputs = []
        for neurons, rows in runs:
            gens = [generators[r] for r in rows]
            with Deactivated(self.linears, neurons):
                outputs.append(self.pipe(prompt=[prompts[r] for r in rows],
                                         generator=gens if isinstance(generator, list) else generator, **kwargs))
            self.records.extend(NeMoPromptRecord(prompts[r], count(neurons)) for r in rows)
        first = outputs[0]
        first.images = _concatenated([output.images for output in outputs])
        return first


def wrap(pipe, settings: NeMoPromptSettings, **_ignored):
    """A callable with the pipeline's own call signature (memprune.generate reads its default guidance scale)."""
    signature = inspect.signature(type(pipe).__call__)

    def __call__(self, *args, **kwargs):
        return NeMoPromptPipeline._call(self, *args, **kwargs)

    __call__.__signature__ = signature  # type: ignore[attr-defined]
    __call__.__doc__ = "The pipeline's call, each prompt with its own NeMo neurons deactivated."
    cls = type(f"NeMoPrompt{type(pipe).__name__}", (NeMoPromptPipeline,), {"__call__": __call__})
    return cls(pipe, settings)
