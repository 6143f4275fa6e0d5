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
- blocking is NeMo's deactivation (as memprune.methods.nemo_criterion.Deactivated: the neuron's output set to what a
  zeroed weight row gives) on every denoiser call of that prompt's generation, both halves of the
  classifier-free-guidance batch (their hook sits on the whole ``to_v`` output);
- the prompts of one pipeline call stay in one call (so memprune detect's score and the timing see an ordinary
  call): `PerSampleDeactivated` blocks each sample's own neurons only, so no image sees another prompt's neurons.

No weight changes. ``records`` holds, per generated image, the number of neurons blocked (metric
``mitigation_neurons`` of evaluate).
"""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import MemPruneError
from ..trace import Trace
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


class PerSampleDeactivated(Trace):
    """Trace: in each value Linear, every sample's own neurons output what a zeroed weight row gives (bias or 0).

    `neurons[i]` belongs to prompt i of the pipeline call; a denoiser batch of k·B rows (classifier-free guidance:
    [unconditional, conditional]) gives row r prompt r mod B's neurons, both halves alike (their hook sits on the whole
    to_v output of a one-prompt call)."""

    def __init__(self, linears: dict[str, nn.Linear], neurons: list[Neurons]):
        self.per_sample = neurons
        self.linears = {layer: linears[layer] for layer in sorted({name for n in neurons for name in n})}
        super().__init__(self.linears, edit_output=self._deactivate)

    def _deactivate(self, output: torch.Tensor, layer: str) -> torch.Tensor | None:
        prompts = len(self.per_sample)
        if output.shape[0] % prompts:
            raise MemPruneError(f"A value layer saw a batch of {output.shape[0]} for {prompts} prompts: NeMo's "
                                "per-prompt blocking needs the pipeline's [unconditional, conditional] layout.")
        bias = self.linears[layer].bias
        output = output.clone()
        for row in range(output.shape[0]):
            rows = self.per_sample[row % prompts].get(layer)
            if rows:
                index = torch.tensor(rows, device=output.device)
                output[row, ..., index] = 0.0 if bias is None else bias[index].to(output.dtype)
        return output


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

    def _call(self, prompt=None, **kwargs):
        if prompt is None or "prompt_embeds" in kwargs:
            raise MemPruneError("NeMo's per-prompt mitigation looks neurons up by prompt text: pass prompt text.")
        if kwargs.get("num_images_per_prompt", 1) != 1:
            raise MemPruneError("NeMo's per-prompt mitigation generates one image per prompt entry: use "
                                "num_images_per_prompt 1 (repeat the prompt instead).")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        neurons = [self.neurons_of(text) for text in prompts]
        with PerSampleDeactivated(self.linears, neurons):
            output = self.pipe(prompt=prompts, **kwargs)
        self.records.extend(NeMoPromptRecord(text, count(n)) for text, n in zip(prompts, neurons, strict=True))
        return output


def wrap(pipe, settings: NeMoPromptSettings, **_ignored):
    """A callable with the pipeline's own call signature (memprune.generate reads its default guidance scale)."""
    signature = inspect.signature(type(pipe).__call__)

    def __call__(self, *args, **kwargs):
        return NeMoPromptPipeline._call(self, *args, **kwargs)

    __call__.__signature__ = signature  # type: ignore[attr-defined]
    __call__.__doc__ = "The pipeline's call, each prompt with its own NeMo neurons deactivated."
    cls = type(f"NeMoPrompt{type(pipe).__name__}", (NeMoPromptPipeline,), {"__call__": __call__})
    return cls(pipe, settings)
