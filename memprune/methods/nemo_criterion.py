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


def first_step(pipe, prompts: list[str], seeds: list[int], steps: int,
               guidance_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, ε̂) of the first denoiser call of a pipeline call, one generation per (prompt, seed) with its own CPU
    generator (as memprune.generate: a seed gives the same x_T in any batch).

    ε̂ is the output converted to an ε-prediction through the scheduler (memprune.prediction); with guidance above 1
    the call runs the classifier-free-guidance batch [unconditional, conditional] and ε̂ is the guided
    ε_u + g·(ε_c − ε_u) (diffusers' order; their compute_noise_diff chunks the halves the other way round)."""
    from ..models import denoiser
    from ..prediction import call_inputs, require_prompt_signal, to_epsilon

    with Trace(denoiser(pipe), retain_input=True, retain_output=True, stop=True) as trace, torch.inference_mode():
        pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="latent",
             generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds])
    if "" not in trace.output:
        raise MemPruneError("The pipeline call ended without calling its denoiser: NeMo cannot measure it.")
    args, kwargs = trace.input[""]
    output = trace.output[""]
    sample, timestep = call_inputs(args, kwargs)
    require_prompt_signal(pipe.scheduler, timestep, "NeMo's first-step noise difference")
    prediction = output[0] if isinstance(output, tuple) else output.sample
    eps = to_epsilon(prediction.float(), sample.float(), timestep, pipe.scheduler)
    sample = sample.float()
    if len(eps) == 2 * len(prompts):  # classifier-free guidance: [unconditional, conditional]
        uncond, cond = eps.chunk(2)
        eps, sample = uncond + guidance_scale * (cond - uncond), sample.chunk(2)[1]
    return sample.cpu(), eps.cpu()


def noise_differences(sample: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """NeMo's noise difference ε̂ − x_t, min-max scaled to [0, 1] per sample and channel."""
    diff = prediction - sample
    if not diff.abs().amax() > 0:
        raise MemPruneError("NeMo's noise difference ε̂ − x_t is 0 at the first step for every seed: the scheduler has "
                            "zero terminal SNR (ᾱ_T = 0, so ε̂ = x_T exactly) and the criterion cannot see the prompt. "
                            "Use a model with SD 1.x's parametrization (non-zero terminal SNR).")
    low, high = diff.amin(dim=(-2, -1), keepdim=True), diff.amax(dim=(-2, -1), keepdim=True)
    return (diff - low) / (high - low).clamp_min(1e-12)


def max_pairwise_ssim(diffs: torch.Tensor) -> torch.Tensor:
    """Each seed's highest (MS-)SSIM against any other seed of the same prompt (memprune.methods.nemo_ssim)."""
    from .nemo_ssim import max_pairwise

    return max_pairwise(diffs)


def pairwise_ssims(diffs: torch.Tensor) -> torch.Tensor:
    """The (MS-)SSIM of every pair of seeds (i < j)."""
    from .nemo_ssim import pairwise

    return pairwise(diffs)[1]
