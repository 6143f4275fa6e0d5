"""The hook's reduction of one activation batch into the neuron statistics of memprune.stats (mean, variance,
mean |a| per neuron), in as few passes as possible.

`batch_statistics(x)` turns x (samples, tokens, H), any float dtype, into float32 vectors of length H:
- sumsq: sum over samples and tokens of (x_j / ||x||)^2
- mean: mean over samples of the token-averaged activation
- m2: sum over samples of the squared deviation of the token-averaged activation from `mean`

On CUDA, when Triton is there, a `torch.compile`d version runs it as a few fused kernels that read x twice (once for
the token norms, once for the normalised squares and the token means, both reduced per sample over tokens) and never
write a float32 copy of it; fp16/bf16 values are widened to float32 inside the kernels. Elsewhere plain torch runs it
(on CPU a matrix-vector product is the fastest normalised sum). The reductions are deterministic, so a batch gives the
same numbers whichever process runs it. MEMPRUNE_FUSED=0 turns the compiled path off.
"""
from __future__ import annotations

import logging
import os

import torch

TINY = torch.finfo(torch.float32).tiny
logger = logging.getLogger(__name__)


def batch_statistics_eager(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain torch, tuned for few ops (CPU, and CUDA without Triton)."""
    width = x.shape[-1]
    # Squares in float32 (fp16 squares overflow); one matrix-vector product normalises and sums per unit.
    squares = x.float().square_() if x.dtype != torch.float32 else x.square()
    inverse_norms = squares.sum(-1).clamp_min_(TINY).reciprocal_()
    sumsq = torch.mv(squares.view(-1, width).t(), inverse_norms.view(-1))
    # mean(dtype=...) copies even when x is already float32, so ask for the dtype only when it differs.
    sample_means = x.mean(dim=1) if x.dtype == torch.float32 else x.mean(dim=1, dtype=torch.float32)
    # Explicit mean/variance: torch.var_mean over dim 0 is ~10x slower on CPU for (few samples, H).
    mean = sample_means.mean(0)
    m2 = (sample_means - mean).square_().sum(0)
    return sumsq, mean, m2


def batch_statistics_fusable(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same, written for a compiler: both big reductions run per sample over tokens, so they fuse into one
    kernel after the token norms; nothing of x's size is materialised."""
    xf = x.float()
    squares = xf * xf
    inverse_norms = 1.0 / squares.sum(-1, keepdim=True).clamp_min(TINY)
    sumsq = (squares * inverse_norms).sum(1).sum(0)
    sample_means = xf.mean(1)
    mean = sample_means.mean(0)
    m2 = (sample_means - mean).square().sum(0)
    return sumsq, mean, m2


_compiled = None
_compile_failed = False


def fused_available(device: torch.device) -> bool:
    """The compiled path: CUDA with Triton, not turned off by MEMPRUNE_FUSED=0, not failed before."""
    if _compile_failed or os.environ.get("MEMPRUNE_FUSED", "1") == "0" or device.type != "cuda":
        return False
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return has_triton()


def batch_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    global _compiled, _compile_failed
    if fused_available(x.device):
        try:
            if _compiled is None:
                # dynamic: one graph for every layer's (samples, tokens, H), no recompiles per shape
                _compiled = torch.compile(batch_statistics_fusable, dynamic=True, fullgraph=True)
            return _compiled(x)
        except Exception as exc:  # a compiler problem must not stop a recording: fall back, say so once
            _compile_failed = True
            logger.warning("memprune: compiled statistics failed (%s); using plain torch.", str(exc).splitlines()[0])
    return batch_statistics_eager(x)
