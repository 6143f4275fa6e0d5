"""Image similarity backends for copy detection: built-in SSIM and normalised L2 (no weights), and SSCD.

Every backend maps images to *features* once and compares features, so that "each generation against
every training image" costs one embedding per image. Images enter as float tensors (N, 3, H, W) with
values in [0, 1] (what `pipe(..., output_type="pt")` returns); higher similarity means more alike.

- ``ssim``: structural similarity (Wang et al. 2004) in pixel space, on [0, 1] RGB (each channel
  separately, then averaged) or on BT.601 luma with ``grayscale=True``. Gaussian window σ = 1.5,
  11 pixels wide for images whose smaller side is at least 64 pixels and 7 pixels below that (the
  32×32 testbed), never wider than the image; statistics over the *valid* window positions only (no
  padding); constants K1 = 0.01, K2 = 0.03 with data range 1. Identical images give exactly 1.
- ``l2``: Carlini et al. 2023's dimension-normalised L2 distance d = sqrt(Σ (a_i − b_i)² / D) on
  [0, 1] RGB pixels, reported as the similarity 1 − d (in [0, 1]; identical images give 1).
- ``sscd``: the field's copy-detection descriptor (Pizzi et al. 2022) from a user-supplied TorchScript
  file (``torch.jit.load``) or ONNX file (needs ``onnxruntime``). Preprocessing as in SSCD: resize the
  shorter side to 256 (bilinear, antialiased), centre crop 224, normalise with mean = std = 0.5; the
  similarity is the cosine of the L2-normalised embeddings.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .errors import MemPruneError

BUILTIN_BACKENDS = ("ssim", "l2")
_LUMA = (0.299, 0.587, 0.114)


# --------------------------------------------------------------------------------------------- images

def as_image_batch(images) -> torch.Tensor:
    """A float32 (N, 3, H, W) tensor in [0, 1] from a tensor, a list of (3, H, W) tensors, PIL images or arrays."""
    if torch.is_tensor(images):
        batch = images.unsqueeze(0) if images.dim() == 3 else images
        return batch.detach().to("cpu", torch.float32)
    items = [image if torch.is_tensor(image) else pil_to_tensor(image) for image in images]
    if not items:
        return torch.zeros(0, 3, 1, 1)
    return torch.stack([item.detach().to("cpu", torch.float32) for item in items])


def pil_to_tensor(image) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1] from a PIL image or an HxWx3 uint8 array; alpha is composited on white."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def tensor_to_pil(image: torch.Tensor):
    from PIL import Image

    array = (image.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(array)


def load_image(path: str | Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A ground-truth image as (3, H, W) in [0, 1], resized (bilinear, antialiased) to `size` = (H, W) if given."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            tensor = pil_to_tensor(image)
    except FileNotFoundError as exc:
        raise MemPruneError(f"Training image '{path}' does not exist: "
                            "fix the image column of the prompt file.") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise MemPruneError(f"Training image '{path}' is not a readable image file.") from exc
    if size is not None and tuple(tensor.shape[-2:]) != tuple(size):
        tensor = F.interpolate(tensor[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    return tensor.clamp(0, 1)


# --------------------------------------------------------------------------------------------- SSIM

def default_ssim_window(height: int, width: int) -> int:
    """11 (Wang et al.) for images of at least 32 pixels a side (the testbed's 32×32 too, as its model card
    measures), 7 below, never wider than the image."""
    size = 11 if min(height, width) >= 32 else 7
    size = min(size, min(height, width))
    return size if size % 2 == 1 else size - 1


def gaussian_window(size: int, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 1-D Gaussian of `size` taps centred on the middle tap."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    weights = torch.exp(-(coords**2) / (2 * sigma**2))
    return weights / weights.sum()


def to_grayscale(images: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def _blur(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter per channel, valid positions only."""
    channels = x.shape[1]
    k = window.to(x.dtype)
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def _ssim_from_moments(mu_x, mu_y, xx, yy, xy, data_range: float) -> torch.Tensor:
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)


def ssim(x: torch.Tensor, y: torch.Tensor, window_size: int | None = None, sigma: float = 1.5,
         data_range: float = 1.0, grayscale: bool = False) -> torch.Tensor:
    """SSIM of each pair x[i], y[i] (N, C, H, W) -> (N,), computed in float64 (see the module docstring)."""
    x, y = as_image_batch(x).double(), as_image_batch(y).double()
    if x.shape != y.shape:
        raise MemPruneError(f"SSIM needs images of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}.")
    if grayscale:
        x, y = to_grayscale(x), to_grayscale(y)
    window = gaussian_window(window_size or default_ssim_window(*x.shape[-2:]), sigma)
    return _ssim_from_moments(_blur(x, window), _blur(y, window), _blur(x * x, window), _blur(y * y, window),
                              _blur(x * y, window), data_range).float()


def ssim_matrix(a: torch.Tensor, b: torch.Tensor, window_size: int | None = None, sigma: float = 1.5,
                data_range: float = 1.0, grayscale: bool = False, chunk: int = 256) -> torch.Tensor:
    """SSIM of every a[i] against every b[j] -> (len(a), len(b)); the per-image moments are computed once."""
    a, b = as_image_batch(a).double(), as_image_batch(b).double()
    if a.shape[1:] != b.shape[1:]:
        raise MemPruneError(f"SSIM needs images of the same shape, got {tuple(a.shape[1:])} and {tuple(b.shape[1:])}.")
    if grayscale:
        a, b = to_grayscale(a), to_grayscale(b)
    window = gaussian_window(window_size or default_ssim_window(*a.shape[-2:]), sigma)
    mu_a, aa = _blur(a, window), _blur(a * a, window)
    mu_b, bb = _blur(b, window), _blur(b * b, window)
    result = torch.empty(len(a), len(b), dtype=torch.float64)
    per_row = max(1, chunk // max(1, len(b)))
    for start in range(0, len(a), per_row):
        stop = min(len(a), start + per_row)
        rows = stop - start
        products = (a[start:stop, None] * b[None]).flatten(0, 1)
        ab = _blur(products, window)
        # products[i * len(b) + j] = a[start + i] * b[j]: repeat a's moments per row, tile b's.
        values = _ssim_from_moments(mu_a[start:stop].repeat_interleave(len(b), dim=0), mu_b.repeat(rows, 1, 1, 1),
                                    aa[start:stop].repeat_interleave(len(b), dim=0), bb.repeat(rows, 1, 1, 1),
                                    ab, data_range)
        result[start:stop] = values.view(rows, len(b))
    return result.float()


# --------------------------------------------------------------------------------------------- L2

def normalized_l2_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Carlini et al.'s sqrt(Σ (x_i − y_i)² / D) per pair (N,), on pixel values in [0, 1]."""
    x, y = as_image_batch(x).double(), as_image_batch(y).double()
    if x.shape != y.shape:
        raise MemPruneError(f"L2 needs images of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}.")
    return ((x - y) ** 2).flatten(1).mean(dim=1).sqrt().float()


# --------------------------------------------------------------------------------------------- backends

class SimilarityBackend(Protocol):
    """What evaluate needs: features once per image, then paired and all-pairs similarities of features."""

    name: str
    description: str

    def features(self, images: torch.Tensor) -> torch.Tensor: ...

    def paired(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor: ...

    def matrix(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor: ...


class SSIMBackend:
    name = "ssim"

    def __init__(self, window_size: int | None = None, sigma: float = 1.5, grayscale: bool = False):
        self.window_size, self.sigma, self.grayscale = window_size, sigma, grayscale
        window = f"{window_size}-pixel" if window_size else "11-pixel (7 for images under 32 px)"
        self.description = (f"SSIM in pixel space ({'BT.601 luma' if grayscale else '[0, 1] RGB'}, "
                            f"{window} Gaussian window, sigma {sigma}; built in, no weights)")

    def features(self, images) -> torch.Tensor:
        return as_image_batch(images)

    def paired(self, a, b) -> torch.Tensor:
        return ssim(a, b, self.window_size, self.sigma, grayscale=self.grayscale)

    def matrix(self, a, b) -> torch.Tensor:
        return ssim_matrix(a, b, self.window_size, self.sigma, grayscale=self.grayscale)


class L2Backend:
    name = "l2"
    description = "1 - normalised L2 distance in pixel space (Carlini et al. 2023; [0, 1] RGB; built in, no weights)"

    def features(self, images) -> torch.Tensor:
        return as_image_batch(images)

    def paired(self, a, b) -> torch.Tensor:
        return 1.0 - normalized_l2_distance(a, b)

    def matrix(self, a, b) -> torch.Tensor:
        a, b = as_image_batch(a).flatten(1).double(), as_image_batch(b).flatten(1).double()
        if a.shape[1] != b.shape[1]:
            raise MemPruneError("L2 needs images of the same shape.")
        return (1.0 - torch.cdist(a, b) / a.shape[1] ** 0.5).float()


def sscd_preprocess(images) -> torch.Tensor:
    """Resize the shorter side to 256 (bilinear, antialiased), centre crop 224, normalise with mean = std = 0.5."""
    batch = as_image_batch(images)
    height, width = batch.shape[-2:]
    scale = 256 / min(height, width)
    size = (max(256, round(height * scale)), max(256, round(width * scale)))
    batch = F.interpolate(batch, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - 224) // 2, (size[1] - 224) // 2
    batch = batch[:, :, top : top + 224, left : left + 224]
    return (batch - 0.5) / 0.5


class SSCDBackend:
    """SSCD descriptors from a user-supplied TorchScript (.pt, .torchscript, ...) or ONNX (.onnx) file."""

    name = "sscd"

    def __init__(self, path: str | Path, batch_size: int = 32):
        self.path = Path(path)
        self.batch_size = batch_size
        if not self.path.is_file():
            raise MemPruneError(f"SSCD model file '{path}' does not exist: give a TorchScript or ONNX file.")
        if self.path.suffix.lower() == ".onnx":
            self._run = self._load_onnx()
            kind = "ONNX"
        else:
            self._run = self._load_torchscript()
            kind = "TorchScript"
        self.description = (f"SSCD ({kind} '{self.path.name}'; resize 256, centre crop 224, normalise 0.5; "
                            "cosine of normalised embeddings)")

    def _load_torchscript(self):
        import warnings

        try:
            with warnings.catch_warnings():  # torch >= 2.10 marks TorchScript deprecated; SSCD ships as TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(str(self.path), map_location="cpu").eval()
        except Exception as exc:  # torch raises RuntimeError/ValueError variants for non-TorchScript files
            raise MemPruneError(f"SSCD model file '{self.path}' is not a TorchScript file (torch.jit.load failed); "
                                "give a TorchScript .pt or an .onnx file.") from exc

        def run(batch: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return module(batch)

        return run

    def _load_onnx(self):
        try:
            import onnxruntime
        except ImportError as exc:
            raise MemPruneError(f"Reading the ONNX SSCD model '{self.path}' needs onnxruntime: "
                                "pip install onnxruntime, or give a TorchScript file.") from exc
        try:
            session = onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise MemPruneError(f"SSCD model file '{self.path}' is not a readable ONNX model.") from exc
        input_name = session.get_inputs()[0].name

        def run(batch: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(np.asarray(session.run(None, {input_name: batch.numpy().astype(np.float32)})[0]))

        return run

    def features(self, images) -> torch.Tensor:
        batch = as_image_batch(images)
        outputs = []
        for start in range(0, len(batch), self.batch_size):
            embedding = self._run(sscd_preprocess(batch[start : start + self.batch_size]))
            if isinstance(embedding, (tuple, list)):
                embedding = embedding[0]
            outputs.append(torch.as_tensor(embedding).float().flatten(1))
        if not outputs:
            return torch.zeros(0, 1)
        return F.normalize(torch.cat(outputs), dim=1)

    def paired(self, a, b) -> torch.Tensor:
        return (a * b).sum(dim=1)

    def matrix(self, a, b) -> torch.Tensor:
        return a @ b.T


def make_backend(name: str = "ssim", sscd: str | Path | None = None) -> SimilarityBackend:
    """SSCD when a model file is given, else the built-in `name` (ssim or l2)."""
    if sscd is not None:
        return SSCDBackend(sscd)
    if name == "ssim":
        return SSIMBackend()
    if name == "l2":
        return L2Backend()
    raise MemPruneError(f"Unknown similarity '{name}': use ssim or l2, or give an SSCD model with --sscd.")


def mean_pairwise(backend: SimilarityBackend, features: torch.Tensor) -> float:
    """Mean similarity over unordered pairs i < j (the diagonal is left out); NaN for fewer than two items."""
    n = len(features)
    if n < 2:
        return float("nan")
    matrix = backend.matrix(features, features)
    upper = torch.triu_indices(n, n, offset=1)
    return float(matrix[upper[0], upper[1]].double().mean())
