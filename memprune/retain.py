"""Retain data of the fine-tuning methods: the unedited model's generations for retain captions, or the VAE latents
of a folder of image/caption pairs (see memprune.finetune for the choices)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .conditioning import encode_conditioning
from .errors import MemPruneError
from .finetune import FinetuneSettings, RetainData
from .latents import vae_encode
from .models import denoiser

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def sample_prompts(prompts: list[str], count: int | None, seed: int) -> list[str]:
    """A seeded sample of `count` prompts (in file order), or all of them."""
    if count is None or count >= len(prompts):
        return list(prompts)
    chosen = np.random.default_rng(seed).choice(len(prompts), size=count, replace=False)
    return [prompts[i] for i in sorted(chosen.tolist())]


def generated_retain_data(pipe, prompts: list[str], settings: FinetuneSettings) -> RetainData:
    """Clean latents of the unedited model's generations for the retain prompts (one per prompt)."""
    from .generate import GenerationSettings, generate

    start = time.perf_counter()
    prompts = sample_prompts(prompts, settings.retain_prompts, settings.seed)
    generation = GenerationSettings(steps=settings.sampling_steps, seeds=1, seed=settings.seed,
                                    guidance_scale=settings.guidance_scale, batch_size=8, height=settings.height,
                                    width=settings.width)
    latents: dict[int, torch.Tensor] = {}
    for index, _, latent in generate(pipe, prompts, generation, output_type="latent", progress=settings.progress,
                                     desc="retain latents"):
        latents[index] = latent.detach().float()
    conditioning = encode_conditioning(pipe, prompts, size=settings.size)
    stacked = torch.stack([latents[i] for i in range(len(prompts))])
    return RetainData(stacked, conditioning, "generated", time.perf_counter() - start)


def read_image_captions(folder: str | Path, option: str = "--retain-images") -> tuple[list[Path], list[str]]:
    """Image/caption pairs of a folder: a metadata.csv / captions.csv (caption + image/file_name columns), or
    one same-named .txt caption beside each image; or of such a CSV file itself (image paths relative to its
    folder; a row repeated is an image seen that many times). Refuses a folder with no images or only empty
    captions. `option` names the input in the refusals."""
    folder = Path(folder)
    if folder.is_file() and folder.suffix.lower() == ".csv":
        images, captions = _table_pairs(folder.parent, folder)
    elif not folder.is_dir():
        raise MemPruneError(f"{option} '{folder}' is not a folder of image/caption pairs (nor a CSV of them).")
    else:
        images, captions = _folder_pairs(folder)
    if not images:
        raise MemPruneError(f"{option} '{folder}' holds no images.")
    if not any(captions):
        raise MemPruneError(f"{option} '{folder}': every caption of its {len(images)} images is empty, so "
                            "there is no retain data.")
    check_images(list(dict.fromkeys(images)))
    return images, captions


def _folder_pairs(folder: Path) -> tuple[list[Path], list[str]]:
    for table in ("metadata.csv", "captions.csv"):
        path = folder / table
        if path.is_file():
            images, captions = _table_pairs(folder, path)
            break
    else:
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        pairs = [(p, p.with_suffix(".txt")) for p in images]
        missing = [p for p, txt in pairs if not txt.is_file()]
        if missing:
            raise MemPruneError(f"Image '{missing[0]}' has no caption: add {missing[0].with_suffix('.txt').name} "
                                "or a metadata.csv with file_name and caption columns.")
        captions = [_utf8(txt).strip() for _, txt in pairs]
    return images, captions


def _utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MemPruneError(f"Caption file '{path}' is not UTF-8 text.") from exc


def _table_pairs(folder: Path, path: Path) -> tuple[list[Path], list[str]]:
    """The image/caption pairs a metadata.csv / captions.csv names."""
    import csv
    import io

    try:
        rows = list(csv.DictReader(io.StringIO(_utf8(path), newline="")))
    except csv.Error as exc:
        raise MemPruneError(f"'{path}' is malformed CSV ({exc}): check its quotes.") from exc
    columns = rows[0].keys() if rows else []
    image_column = next((c for c in ("file_name", "image", "file") if c in columns), None)
    caption_column = next((c for c in ("caption", "text", "prompt", "Caption") if c in columns), None)
    if image_column is None or caption_column is None:
        raise MemPruneError(f"'{path}' needs an image column (file_name/image) and a caption column (caption/text).")
    images = [folder / (row[image_column] or "") for row in rows]
    missing = [p for p in images if not p.is_file()]
    if missing:
        raise MemPruneError(f"'{path}' names image '{missing[0]}', which does not exist.")
    return images, [(row[caption_column] or "").strip() for row in rows]


def _unreadable(path: Path, exc: Exception) -> MemPruneError:
    return MemPruneError(f"Image '{path}' cannot be read as an image ({type(exc).__name__}): replace or remove it.")


def check_images(images: list[Path]) -> None:
    """Refuse, before a model loads, an image file PIL cannot read (naming it), instead of a traceback later."""
    from PIL import Image, UnidentifiedImageError

    for path in images:
        try:
            with Image.open(path) as image:
                image.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise _unreadable(path, exc) from exc


def _image_tensor(path: Path, size: int) -> torch.Tensor:
    from PIL import Image

    try:
        image = Image.open(path).convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's UnidentifiedImageError and truncated files
        raise _unreadable(path, exc) from exc
    scale = size / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                         Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def image_retain_data(pipe, folder: str | Path, settings: FinetuneSettings,
                      option: str = "--retain-images") -> RetainData:
    """VAE latents (posterior mean) of a folder's (or a CSV's) images, with their captions' conditioning."""
    start = time.perf_counter()
    images, captions = read_image_captions(folder, option)
    net = denoiser(pipe)
    default = int(net.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))
    size = settings.size[0] if settings.size else default
    latents = []
    for start_index in range(0, len(images), 8):
        pixels = torch.stack([_image_tensor(p, size) for p in images[start_index:start_index + 8]])
        latents.append(vae_encode(pipe, pixels).float())
    conditioning = encode_conditioning(pipe, captions, size=settings.size)
    return RetainData(torch.cat(latents), conditioning, "images", time.perf_counter() - start)
