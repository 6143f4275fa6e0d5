"""Image similarity of the testbed (SSIM, nearest-SSIM search, VAE reconstruction ceiling).

A leaf module: data, attributes and measure all use it, so none of them imports another for it.
"""
from __future__ import annotations

import numpy as np
import torch


def to_float(images) -> torch.Tensor:
    """uint8 N×H×W×3 (numpy) or float tensor N×3×H×W in [0, 1] → float tensor N×3×H×W in [0, 1]."""
    if isinstance(images, np.ndarray):
        if images.dtype == np.uint8:
            return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        return torch.from_numpy(images).permute(0, 3, 1, 2).float()
    return images.float()


def ssim(a, b, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM (Wang et al. 2004, per RGB channel, valid Gaussian window) of paired images → N; the one SSIM of
    memprune (memprune.similarity), so the model card and `memprune evaluate` measure alike."""
    from ..similarity import ssim as shared_ssim

    return shared_ssim(to_float(a), to_float(b), window_size=window, sigma=sigma)


def nearest_ssim(queries, refs, top_k: int = 32, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query image, the highest SSIM over `refs` and its index.

    SSIM is evaluated on the `top_k` nearest references by pixel L2 (exact SSIM over thousands
    of references per query would be slow and the best SSIM is always among the L2-nearest)."""
    q, r = to_float(queries), to_float(refs)
    d = torch.cdist(q.flatten(1), r.flatten(1))
    cand = d.topk(min(top_k, len(r)), largest=False).indices  # Q × K
    qq = q[:, None].expand(-1, cand.shape[1], -1, -1, -1).reshape(-1, *q.shape[1:])
    rr = r[cand.reshape(-1)]
    s = torch.cat([ssim(qq[i : i + chunk], rr[i : i + chunk]) for i in range(0, len(qq), chunk)]).view(cand.shape)
    best, j = s.max(1)
    return best, cand.gather(1, j[:, None])[:, 0]


@torch.no_grad()
def vae_reconstruct(vae, images: np.ndarray) -> np.ndarray:
    """Encode (posterior mean) and decode: the best image any diffusion sample can reach."""
    x = to_float(images) * 2 - 1
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    return ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
