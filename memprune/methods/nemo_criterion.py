"""NeMo's measurements on a pipeline: its value layers, their activations, their deactivation, and the first-step
noise differences whose seed-to-seed SSIM is the memorization criterion (see memprune.methods.nemo)."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import MemPruneError
from ..trace import Trace
from .nemo_search import Neurons


def nemo_layers(net: nn.Module, which: str = "down_mid") -> dict[str, nn.Linear]:
    """The cross-attention value Linears NeMo looks at: those inside the UNet's down and mid blocks (their code), or
    all; a denoiser without down/mid blocks (DiT) gives all of them."""
    from ..models import value_linears

    linears = value_linears(net)
    if not linears:
        raise MemPruneError("The denoiser has no cross-attention value layers (to_v): NeMo has nothing to record.")
    if which == "all":
        return linears
    blocks = [getattr(net, "down_blocks", None), getattr(net, "mid_block", None)]
    inside = {id(module) for block in blocks if isinstance(block, nn.Module) for module in block.modules()}
    chosen = {name: linear for name, linear in linears.items() if id(linear) in inside}
    return chosen or linears


class ValueRecorder(Trace):
    """Trace: per value Linear, the token-mean of |output| of every sample it sees, as float64 rows.
    On exit it removes exactly the hooks it added."""

    def __init__(self, linears: dict[str, nn.Linear]):
        super().__init__(linears, edit_output=self._record)
        self.rows: dict[str, list[torch.Tensor]] = {name: [] for name in linears}

    def _record(self, output: torch.Tensor, name: str) -> None:
        value = output if output.dim() == 3 else output.unsqueeze(1)
        self.rows[name].append(value.detach().abs().mean(dim=1).double().cpu())

    def take(self) -> dict[str, torch.Tensor]:
        """The rows recorded since the last take, (samples, H) per layer."""
        taken = {name: torch.cat(rows) if rows else torch.zeros(0) for name, rows in self.rows.items()}
        self.rows = {name: [] for name in self.modules}
        return taken


class Deactivated(Trace):
    """Trace: the given neurons of value Linears output what a zeroed weight row gives (their bias, or 0)."""

    def __init__(self, linears: dict[str, nn.Linear], neurons: Neurons | None):
        self.neurons = {layer: rows for layer, rows in (neurons or {}).items() if rows}
        self.linears = {layer: linears[layer] for layer in self.neurons}
        super().__init__(self.linears, edit_output=self._deactivate)

    def _deactivate(self, output: torch.Tensor, layer: str) -> torch.Tensor:
        index = torch.tensor(self.neurons[layer], device=output.device)
        bias = self.linears[layer].bias
        if bias is None:
            return output.index_fill(-1, index, 0.0)
        output = output.clone()
        output[..., index] = bias[index].to(output.dtype)
        return output


def first_step(pipe, prompts: list[str], seeds: list[int], steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent input, noise prediction) of the first denoiser call of an unguided pipeline call, one generation per
    (prompt, seed) with its own CPU generator (as memprune.generate: a seed gives the same x_T in any batch)."""
    from ..models import denoiser

    with Trace(denoiser(pipe), retain_input=True, retain_output=True, stop=True) as trace, torch.inference_mode():
        pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=1.0, output_type="latent",
             generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds])
    if "" not in trace.output:
        raise MemPruneError("The pipeline call ended without calling its denoiser: NeMo cannot measure it.")
    args, kwargs = trace.input[""]
    output = trace.output[""]
    sample = args[0] if args else kwargs["sample"]
    prediction = output[0] if isinstance(output, tuple) else output.sample
    return sample.float().cpu(), prediction.float().cpu()


def noise_differences(sample: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """NeMo's noise difference ε̂ − x, min-max scaled to [0, 1] per sample and channel."""
    diff = prediction - sample
    low, high = diff.amin(dim=(-2, -1), keepdim=True), diff.amax(dim=(-2, -1), keepdim=True)
    return (diff - low) / (high - low).clamp_min(1e-12)


def max_pairwise_ssim(diffs: torch.Tensor) -> torch.Tensor:
    """Each seed's highest SSIM against any other seed of the same prompt."""
    from ..similarity import ssim_matrix

    matrix = ssim_matrix(diffs, diffs)
    matrix.fill_diagonal_(float("-inf"))
    return matrix.max(dim=1).values


def pairwise_ssims(diffs: torch.Tensor) -> torch.Tensor:
    from ..similarity import ssim_matrix

    rows, columns = torch.triu_indices(len(diffs), len(diffs), offset=1)
    return ssim_matrix(diffs, diffs)[rows, columns]
