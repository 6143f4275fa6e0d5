"""UniForget's hard-concrete (L0) gates: the gate formulas, one gate per FeedForward neuron, the hooks that apply
them and the closed gates as a mask (the choices behind them are in memprune.methods.uniforget's docstring)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pandas as pd
import torch
from torch import nn

from ..errors import MemPruneError
from ..masks import Masks
from ..models import output_linears
from ..trace import Inputs, Trace

if TYPE_CHECKING:
    from .uniforget_relax import RelaxedMasks

GAMMA = -0.1
ZETA = 1.1
TEMPERATURE = 2.0 / 3.0


def hard_concrete_sample(log_alpha: torch.Tensor, u: torch.Tensor, temperature: float = TEMPERATURE,
                         gamma: float = GAMMA, zeta: float = ZETA) -> torch.Tensor:
    """Stochastic gate for uniform noise u in (0, 1): clamp(sigmoid((log u - log(1-u) + log_alpha)/β)·(ζ-γ)+γ, 0, 1)."""
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / temperature)
    return torch.clamp(s * (zeta - gamma) + gamma, 0.0, 1.0)


def hard_concrete_deterministic(log_alpha: torch.Tensor, gamma: float = GAMMA, zeta: float = ZETA) -> torch.Tensor:
    """Test-time gate: clamp(sigmoid(log_alpha)·(ζ-γ)+γ, 0, 1)."""
    return torch.clamp(torch.sigmoid(log_alpha) * (zeta - gamma) + gamma, 0.0, 1.0)


def expected_l0(log_alpha: torch.Tensor, temperature: float = TEMPERATURE, gamma: float = GAMMA,
                zeta: float = ZETA) -> torch.Tensor:
    """Probability that the stochastic gate is non-zero: sigmoid(log_alpha - β·log(-γ/ζ))."""
    return torch.sigmoid(log_alpha - temperature * math.log(-gamma / zeta))


class NeuronGates:
    """One hard-concrete gate per hidden neuron of every FeedForward, keyed by the FeedForward's dotted name.

    `resample(generator)` draws stochastic gates (kept until the next resample); `deterministic()` switches to the
    test-time gates. `apply(net)` is a context manager that multiplies each output Linear's input by its gates.
    """

    def __init__(self, widths: dict[str, int], init_log_alpha: float = 3.0, temperature: float = TEMPERATURE,
                 gamma: float = GAMMA, zeta: float = ZETA, device: str | torch.device = "cpu"):
        if not gamma < 0 < 1 < zeta:
            raise MemPruneError(f"Hard-concrete stretch needs gamma < 0 and zeta > 1, got gamma={gamma}, zeta={zeta}.")
        self.temperature, self.gamma, self.zeta = temperature, gamma, zeta
        self.log_alpha = {
            name: torch.full((width,), float(init_log_alpha), dtype=torch.float32, device=device, requires_grad=True)
            for name, width in widths.items()
        }
        self.mode = "deterministic"
        self._sampled: dict[str, torch.Tensor] = {}

    @classmethod
    def for_denoiser(cls, net: nn.Module, **kwargs) -> NeuronGates:
        device = next(net.parameters()).device
        widths = {name: linear.in_features for name, linear in output_linears(net).items()}
        return cls(widths, device=kwargs.pop("device", device), **kwargs)

    @property
    def layers(self) -> list[str]:
        return list(self.log_alpha)

    def parameters(self) -> list[torch.Tensor]:
        return list(self.log_alpha.values())

    def resample(self, generator: torch.Generator | None = None, u: dict[str, torch.Tensor] | None = None) -> None:
        """Stochastic mode with fresh gates: u drawn on the CPU from `generator` (or given per layer)."""
        self.mode = "stochastic"
        self._sampled = {}
        for name, log_alpha in self.log_alpha.items():
            noise = u[name] if u is not None else torch.rand(log_alpha.shape, generator=generator)
            noise = noise.to(log_alpha.device, torch.float32).clamp(1e-6, 1 - 1e-6)
            self._sampled[name] = hard_concrete_sample(log_alpha, noise, self.temperature, self.gamma, self.zeta)

    def deterministic(self) -> None:
        self.mode = "deterministic"
        self._sampled = {}

    def z(self, name: str) -> torch.Tensor:
        """The gate values now in force for one layer (sampled in stochastic mode, test-time otherwise)."""
        if self.mode == "stochastic":
            return self._sampled[name]
        return hard_concrete_deterministic(self.log_alpha[name], self.gamma, self.zeta)

    def expected_l0(self) -> torch.Tensor:
        """Mean expected L0 over all gates of all layers pooled: the expected share of open gates."""
        values = torch.cat([expected_l0(a, self.temperature, self.gamma, self.zeta) for a in self.log_alpha.values()])
        return values.mean()

    def closed(self, threshold: float = 0.0) -> dict[str, torch.Tensor]:
        """Per layer, bool (H,): neurons whose deterministic gate is <= threshold (default: exactly 0)."""
        with torch.no_grad():
            return {name: (hard_concrete_deterministic(a, self.gamma, self.zeta) <= threshold).cpu()
                    for name, a in self.log_alpha.items()}

    def pruned_share(self, threshold: float = 0.0) -> pd.DataFrame:
        """Per layer: hidden width, pruned neurons and their share (tidy, one row per layer)."""
        rows = [{"layer": name, "hidden": int(c.numel()), "pruned": int(c.sum()), "share": float(c.float().mean())}
                for name, c in self.closed(threshold).items()]
        return pd.DataFrame(rows, columns=["layer", "hidden", "pruned", "share"])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: a.detach().cpu().clone() for name, a in self.log_alpha.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, value in state.items():
                if name not in self.log_alpha or self.log_alpha[name].shape != value.shape:
                    raise MemPruneError(f"Gates for layer '{name}' do not match this model's FeedForward layers.")
                self.log_alpha[name].copy_(value)

    def apply(self, net: nn.Module) -> GateHooks:
        return GateHooks(net, self)


class GateHooks(Trace):
    """Trace: forward pre-hooks on every gated output Linear multiply its input (..., H) by the gates.

    On exit it removes exactly the hooks it added, also after an exception.
    """

    def __init__(self, net: nn.Module, gates: NeuronGates):
        linears = output_linears(net)
        missing = [name for name in gates.layers if name not in linears]
        if missing:
            raise MemPruneError(f"Gate layer '{missing[0]}' is not a FeedForward of this model.")
        super().__init__({name: linears[name] for name in gates.layers}, edit_input=self._gate)
        self.linears = self.modules
        self.gates = gates

    def _gate(self, inputs: Inputs, name: str) -> Inputs:
        x = inputs.args[0]
        return Inputs((x * self.gates.z(name).to(x.dtype),) + tuple(inputs.args[1:]), inputs.kwargs)


def uniforget_masks(gates: NeuronGates | RelaxedMasks, shapes: dict[str, list[int]], steps: int = 50,
                    threshold: float = 0.0, meta: dict | None = None) -> Masks:
    """Closed gates (or closed FFN masks) as a neuron-granularity mask (whole columns of each output Linear's C x H
    weight), the same for steps 0..steps-1."""
    indices, mask_shapes = {}, {}
    for layer, closed in gates.closed(threshold).items():
        rows, columns = shapes[layer]
        if closed.numel() != columns:
            raise MemPruneError(f"Gates of layer '{layer}' have {closed.numel()} neurons "
                                f"but its weight has {columns} columns.")
        dense = closed[None, :].expand(rows, columns)
        flat = dense.flatten().nonzero().squeeze(1)
        mask_shapes[layer] = (int(rows), int(columns))
        for step in range(steps):
            indices[(layer, step)] = flat.clone()  # one tensor per key: safetensors refuses shared storage
    return Masks(indices=indices, shapes=mask_shapes, meta=dict(meta or {}))
