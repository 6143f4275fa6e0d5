"""UniForget's relaxed masks: one learnable logit M per FeedForward hidden neuron and per channel of every
normalisation layer, applied as the continuous mask σ(0.4·M + 1), with the sparsity penalty, the binarisation and
the weight edit that realises a pruned normalisation channel (the choices are in memprune.methods.uniforget's
docstring).

Normalisation layers are found by type (torch's GroupNorm and LayerNorm, never by name) and kept only when they
have an affine weight: a mask m on a channel of y = n(x)·w + b gives m·y = n(x)·(m·w) + m·b, so a pruned channel
(m = 0) is exactly the channel's weight and bias set to zero, which a saved pipeline can hold. A LayerNorm without
affine parameters has nothing to zero, so it gets no mask.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from torch import nn

from ..errors import MemPruneError
from ..models import output_linears
from ..trace import Inputs, Trace

SLOPE = 0.4
OFFSET = 1.0
NORM_CHANNELS_FILE = "norm_channels.safetensors"
LAYER_KINDS = ("ffn", "norm")


def relaxed_mask(logits: torch.Tensor) -> torch.Tensor:
    """UniForget's relaxation of a mask logit M: σ(0.4·M + 1) (σ(1) ≈ 0.731 at M = 0)."""
    return torch.sigmoid(SLOPE * logits + OFFSET)


def logit_for(value: float) -> float:
    """The M whose relaxed mask is `value` (0 < value < 1): (logit(value) - 1) / 0.4."""
    import math

    return (math.log(value / (1 - value)) - OFFSET) / SLOPE


Norm = nn.GroupNorm | nn.LayerNorm


def norm_layers(net: nn.Module) -> dict[str, Norm]:
    """Every GroupNorm / LayerNorm of the denoiser with an affine weight, by dotted name (found by type)."""
    return {name: module for name, module in net.named_modules()
            if isinstance(module, (nn.GroupNorm, nn.LayerNorm)) and getattr(module, "weight", None) is not None}


def _affine(norm: Norm) -> list[torch.Tensor]:
    """The norm's weight, and its bias when it has one."""
    return [p for p in (norm.weight, norm.bias) if isinstance(p, torch.Tensor)]


def _channels(norm: Norm) -> int:
    return int(_affine(norm)[0].numel())


def _channel_view(mask: torch.Tensor, output: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """The mask shaped to broadcast over a norm's output: channel dim 1 for GroupNorm, the last dim for LayerNorm."""
    if isinstance(norm, nn.GroupNorm):
        return mask.view(1, -1, *([1] * (output.dim() - 2)))
    return mask.view(*([1] * (output.dim() - mask.dim())), *mask.shape)


class RelaxedMasks:
    """Mask logits per FeedForward (its hidden neurons) and per normalisation layer (its channels).

    The same interface as `NeuronGates` where the training loop needs it: `parameters()`, `resample()` and
    `deterministic()` (no-ops: the relaxation is deterministic), `penalty()`, `closed()`, `pruned_share()`,
    `apply(net)`, `state_dict()`.
    """

    penalty_name = "mask_mean"

    def __init__(self, ffn: dict[str, int], norms: dict[str, int], init_logit: float = 0.0,
                 device: str | torch.device = "cpu"):
        def logits(width: int) -> torch.Tensor:
            return torch.full((width,), float(init_logit), dtype=torch.float32, device=device, requires_grad=True)

        self.ffn = {name: logits(width) for name, width in ffn.items()}
        self.norms = {name: logits(width) for name, width in norms.items()}

    @classmethod
    def for_denoiser(cls, net: nn.Module, layers: tuple[str, ...] = LAYER_KINDS, init_logit: float = 0.0
                     ) -> RelaxedMasks:
        unknown = [kind for kind in layers if kind not in LAYER_KINDS]
        if unknown or not layers:
            raise MemPruneError(f"UniForget mask layers must be among {', '.join(LAYER_KINDS)}, got {list(layers)}.")
        device = next(net.parameters()).device
        ffn = {name: linear.in_features for name, linear in output_linears(net).items()} if "ffn" in layers else {}
        norms = {name: _channels(norm) for name, norm in norm_layers(net).items()} if "norm" in layers else {}
        if not ffn and not norms:
            raise MemPruneError("UniForget found no FeedForward or normalisation layer to mask in this denoiser.")
        return cls(ffn, norms, init_logit, device)

    @property
    def layers(self) -> list[str]:
        return list(self.ffn) + list(self.norms)

    def _all(self) -> dict[str, torch.Tensor]:
        return {**self.ffn, **self.norms}

    def parameters(self) -> list[torch.Tensor]:
        return list(self._all().values())

    def resample(self, generator: torch.Generator | None = None) -> None:
        """Nothing to draw: the relaxation is deterministic."""

    def deterministic(self) -> None:
        """Always deterministic."""

    def value(self, name: str) -> torch.Tensor:
        return relaxed_mask(self._all()[name])

    def penalty(self) -> torch.Tensor:
        """Mean relaxed mask value over every masked unit pooled (FFN neurons and norm channels): the L1 norm of
        the (positive) mask divided by its size."""
        return torch.cat([relaxed_mask(m) for m in self.parameters()]).mean()

    def closed(self, threshold: float = 0.5, kind: str = "ffn") -> dict[str, torch.Tensor]:
        """Per layer of `kind`, bool: units whose relaxed mask is <= threshold (they are pruned)."""
        chosen = self.ffn if kind == "ffn" else self.norms
        with torch.no_grad():
            return {name: (relaxed_mask(m) <= threshold).cpu() for name, m in chosen.items()}

    def closed_norm_channels(self, threshold: float = 0.5) -> dict[str, torch.Tensor]:
        """Per norm layer with any pruned channel, the int64 indices of its pruned channels."""
        return {name: closed.nonzero().squeeze(1) for name, closed in self.closed(threshold, "norm").items()
                if closed.any()}

    def pruned_share(self, threshold: float = 0.5) -> pd.DataFrame:
        rows = [{"layer": name, "kind": kind, "hidden": int(c.numel()), "pruned": int(c.sum()),
                 "share": float(c.float().mean())}
                for kind in LAYER_KINDS for name, c in self.closed(threshold, kind).items()]
        return pd.DataFrame(rows, columns=["layer", "kind", "hidden", "pruned", "share"])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: m.detach().cpu().clone() for name, m in self._all().items()}

    def apply(self, net: nn.Module) -> RelaxedMaskHooks:
        return RelaxedMaskHooks(net, self)


class RelaxedMaskHooks(Trace):
    """Trace: FeedForward output Linears get their input (..., H) multiplied by the relaxed mask; normalisation
    layers get their output multiplied per channel. Removes exactly its hooks on exit."""

    def __init__(self, net: nn.Module, masks: RelaxedMasks):
        linears, norms = output_linears(net), norm_layers(net)
        missing = [n for n in masks.ffn if n not in linears] + [n for n in masks.norms if n not in norms]
        if missing:
            raise MemPruneError(f"Mask layer '{missing[0]}' is not a FeedForward or normalisation layer of this model.")
        modules = {**{name: linears[name] for name in masks.ffn}, **{name: norms[name] for name in masks.norms}}
        super().__init__(modules, edit_input=self._ffn, edit_output=self._norm)
        self.masks = masks

    def _ffn(self, inputs: Inputs, name: str) -> Inputs | None:
        if name not in self.masks.ffn:
            return None
        x = inputs.args[0]
        return Inputs((x * self.masks.value(name).to(x.dtype),) + tuple(inputs.args[1:]), inputs.kwargs)

    def _norm(self, output: torch.Tensor, name: str) -> torch.Tensor | None:
        if name not in self.masks.norms:
            return None
        mask = self.masks.value(name).to(output.dtype)
        return output * _channel_view(mask, output, self.modules[name])


# --------------------------------------------------------------------------------------------------------------
# Pruned normalisation channels as a weight edit
# --------------------------------------------------------------------------------------------------------------


def save_norm_channels(channels: dict[str, torch.Tensor], folder: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(folder) / NORM_CHANNELS_FILE
    save_file({name: idx.to(torch.int64).contiguous() for name, idx in channels.items()}, str(path))
    return path


def load_norm_channels(folder: str | Path) -> dict[str, torch.Tensor] | None:
    """The pruned norm channels of a UniForget masks folder, or None when it has none (a Wanda/NeMo folder)."""
    from safetensors.torch import load_file

    given = Path(folder)
    path = (given.parent if given.is_file() else given) / NORM_CHANNELS_FILE
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except Exception as exc:
        raise MemPruneError(f"'{path}' is unreadable or malformed: {exc}.") from exc


def zero_norm_channels(net: nn.Module, channels: dict[str, torch.Tensor]) -> dict[str, int]:
    """Set the weight and bias of the pruned channels of each norm layer to zero, in place; the count per layer."""
    norms = norm_layers(net)
    zeroed = {}
    with torch.no_grad():
        for name, idx in channels.items():
            norm = norms.get(name)
            if norm is None or (idx.numel() and int(idx.max()) >= _channels(norm)):
                raise MemPruneError(f"The masks name normalisation channels of '{name}', which this model does not "
                                    "have: they were made for another model.")
            for param in _affine(norm):
                param[idx.to(param.device)] = 0
            zeroed[name] = int(idx.numel())
    return zeroed


def verify_norm_channels(net: nn.Module, channels: dict[str, torch.Tensor]) -> int:
    """Check every pruned channel's weight (and bias) is zero in `net`; the number of channels checked."""
    norms = norm_layers(net)
    for name, idx in channels.items():
        for param in _affine(norms[name]):
            if torch.count_nonzero(param.detach()[idx]):
                raise MemPruneError(f"Verification failed: pruned channels of {name} are not zero after reload.")
    return sum(int(idx.numel()) for idx in channels.values())
