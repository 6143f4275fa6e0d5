"""NeMo's similarity of noise differences: multi-scale SSIM as their code calls it, written out here.

Their call is torchmetrics' ``multiscale_structural_similarity_index_measure(x, y, kernel_size=11, betas=(0.33, 0.33,
0.33))`` with its defaults: a Gaussian window of σ = 1.5 (11 taps), k1 = 0.01, k2 = 0.03, the data range the larger
value range of the two inputs, variances clamped at 0, SSIM and contrast-structure maps averaged over the positions
whose window lies inside the image, both passed through ReLU ("relu" normalisation), 2×2 average pooling between
scales, and the product Π_{j<M} cs_j^{β_j} · ssim_M^{β_M}. memprune depends on neither torchmetrics nor
pytorch_msssim, so `ms_ssim` is that formula in a few lines of torch (float64). Two differences, both deliberate:

- the data range is taken per pair, not over the whole batch of pairs, so a pair's value does not depend on which
  other pairs are computed with it (for min-max scaled noise differences both give 1 at the first scale);
- the number of scales follows the latent size. Three scales need a side of at least 44 latent pixels (the coarsest
  scale must still hold an 11-tap window; SD 1.x's 64×64 latents do), two need 22, one 11: memprune uses the largest
  number that fits (weights 0.33 each for three scales, as theirs; 1/M each for fewer, so one scale is plain SSIM).
  Below 11 pixels a side (the testbed's 8×8 latents) it is single-scale SSIM with the widest odd Gaussian window
  that fits (7 taps on 8×8). `scales_for` says which applies.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

THEIR_BETAS = (0.33, 0.33, 0.33)
THEIR_WINDOW = 11  # taps of a σ = 1.5 Gaussian in torchmetrics (int(3.5·σ + 0.5)·2 + 1)
SIGMA = 1.5


def scales_for(height: int, width: int) -> tuple[tuple[float, ...], int]:
    """(betas, window taps) for latents of this size (module docstring)."""
    side = min(height, width)
    for scales in (3, 2, 1):
        if side // 2 ** (scales - 1) >= THEIR_WINDOW:
            return (THEIR_BETAS if scales == 3 else (1.0 / scales,) * scales), THEIR_WINDOW
    window = side if side % 2 else side - 1
    return (1.0,), max(window, 1)


def _gaussian(taps: int) -> torch.Tensor:
    coords = torch.arange(taps, dtype=torch.float64) - (taps - 1) / 2
    weights = torch.exp(-(coords**2) / (2 * SIGMA**2))
    return weights / weights.sum()


def _blur(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian per channel, valid positions only."""
    channels = x.shape[1]
    x = F.conv2d(x, window.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, window.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def _ssim_and_cs(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair (N,): mean SSIM and mean contrast-structure over valid positions, data range per pair."""
    flat_x, flat_y = x.flatten(1), y.flatten(1)
    data_range = torch.maximum(flat_x.amax(1) - flat_x.amin(1), flat_y.amax(1) - flat_y.amin(1)).view(-1, 1, 1, 1)
    data_range = data_range.clamp_min(1e-12)  # two constant images: 1 when equal, instead of torchmetrics' 0/0
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = _blur(x, window), _blur(y, window)
    var_x = (_blur(x * x, window) - mu_x**2).clamp_min(0)
    var_y = (_blur(y * y, window) - mu_y**2).clamp_min(0)
    cov = _blur(x * y, window) - mu_x * mu_y
    cs_map = (2 * cov + c2) / (var_x + var_y + c2)
    ssim_map = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * cs_map
    return ssim_map.flatten(1).mean(1), cs_map.flatten(1).mean(1)


def ms_ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """NeMo's similarity of each pair x[i], y[i] (N, C, H, W) -> (N,) float32 (module docstring)."""
    x, y = x.double(), y.double()
    betas, taps = scales_for(*x.shape[-2:])
    window = _gaussian(taps).to(x.device)
    factors = []
    for scale, beta in enumerate(betas):
        ssim, cs = _ssim_and_cs(x, y, window)
        last = scale == len(betas) - 1
        factors.append((ssim if last else cs).clamp_min(0) ** beta)
        if not last:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return torch.stack(factors).prod(0).float()


def pairwise(diffs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pairs (P, 2) with i < j, their similarity (P,)) over all pairs of the seeds in `diffs`."""
    pairs = torch.combinations(torch.arange(len(diffs)), r=2)
    return pairs, ms_ssim(diffs[pairs[:, 0]], diffs[pairs[:, 1]])


def max_pairwise(diffs: torch.Tensor) -> torch.Tensor:
    """Each seed's highest similarity to any other seed of the same prompt (their calculate_max_pairwise_ssim)."""
    pairs, values = pairwise(diffs)
    return torch.stack([values[(pairs == index).any(1)].max() for index in range(len(diffs))])
