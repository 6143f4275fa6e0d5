"""ActivationRecorder: forward hooks on every FeedForward's output Linear, reduced into NeuronStats."""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .errors import MemPruneError
from .models import output_linears
from .stats import NeuronStats
from .trace import Inputs, Trace

Half = Literal["both", "cond", "uncond"]
HALVES = ("both", "cond", "uncond")


class ActivationRecorder:
    """Context manager recording FFN hidden activations of a denoiser, per layer and per sampling step.

    The step is the index of the denoiser call since the last `new_generation()` (0 = first, noisiest call).
    With classifier-free guidance the pipeline batches [unconditional, conditional]; `half` picks which part
    is recorded. On exit it removes exactly the hooks it added, also after an exception.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        half: Half = "both",
        cfg: bool = True,
        stats: NeuronStats | None = None,
        layer_filter=None,
    ):
        if half not in HALVES:
            raise MemPruneError(f"Unknown half '{half}': use one of {', '.join(HALVES)}.")
        if not cfg and half == "uncond":
            raise MemPruneError("half='uncond' needs classifier-free guidance (guidance scale > 1).")
        self.denoiser = denoiser
        self.half = half
        self.cfg = cfg
        self.stats = stats if stats is not None else NeuronStats()
        linears = output_linears(denoiser)
        self.linears = {name: m for name, m in linears.items() if layer_filter is None or layer_filter(name)}
        self.step = -1
        self._traces = [Trace(denoiser, edit_input=self._on_denoiser_call),
                        Trace(self.linears, edit_input=self._on_feedforward_input)]
        self._timesteps: dict[int, torch.Tensor | float] = {}  # read lazily: float() of a GPU tensor is a sync

    def new_generation(self) -> None:
        """Call before each pipeline call: the next denoiser call is step 0."""
        self.step = -1

    def _on_denoiser_call(self, inputs: Inputs, name: str) -> None:
        self.step += 1
        timestep = inputs.args[1] if len(inputs.args) > 1 else inputs.kwargs.get("timestep")
        if timestep is not None and self.step not in self.stats.timesteps and self.step not in self._timesteps:
            first = timestep.flatten()[0].detach().clone() if torch.is_tensor(timestep) else timestep
            self._timesteps[self.step] = first

    def _settle_timesteps(self) -> None:
        for step, value in self._timesteps.items():
            self.stats.timesteps.setdefault(step, float(value))
        self._timesteps.clear()

    def take_stats(self) -> NeuronStats:
        """The statistics recorded so far; recording goes on into fresh ones (one pipeline call's worth each)."""
        self._settle_timesteps()
        stats, self.stats = self.stats, NeuronStats()
        return stats

    def _select_half(self, x: torch.Tensor) -> torch.Tensor:
        if self.half == "both" or not self.cfg:
            return x
        if x.shape[0] % 2:
            raise MemPruneError(
                f"half='{self.half}' expects a classifier-free-guidance batch [uncond, cond], "
                "but a FeedForward saw an odd "
                f"batch of {x.shape[0]}: this pipeline does not batch CFG; use half='both'.")
        half_size = x.shape[0] // 2
        return x[:half_size] if self.half == "uncond" else x[half_size:]

    def _on_feedforward_input(self, inputs: Inputs, layer: str) -> None:
        if self.step < 0:
            raise MemPruneError("ActivationRecorder saw a FeedForward call before any denoiser call.")
        self.stats.update(layer, self.step, self._select_half(inputs.args[0].detach()))

    def __enter__(self) -> ActivationRecorder:
        try:
            for trace in self._traces:
                trace.__enter__()
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        self._settle_timesteps()
        for trace in self._traces:
            trace.remove()

    def __exit__(self, *exc_info) -> None:
        self.remove()


def check_half(pipe, half: str, cfg: bool) -> None:
    """Refuse a CFG half the pipeline cannot give, in one sentence that says why."""
    from .generate import guidance_distilled

    if half != "both" and guidance_distilled(pipe):
        raise MemPruneError(
            f"{type(pipe).__name__} is guidance-distilled: "
            "its guidance scale is an input of the transformer and it runs "
            f"no [uncond, cond] batch, so there is no '{half}' half to record; use --half both (every activation is "
            "conditional).")
    if half == "uncond" and not cfg:
        raise MemPruneError("half='uncond' needs classifier-free guidance (guidance scale > 1).")
