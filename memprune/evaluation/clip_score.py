"""CLIP score: how well a generation follows its prompt, with the user's CLIP.

Definition (torchmetrics' ``CLIPScore``, which follows Hessel et al. 2021 without their 2.5 factor): for an image and
its caption, 100 * max(cos(image embedding, text embedding), 0), the embeddings being CLIP's projected image and text
embeddings; ``clip_score`` is its mean over a group's generations, per model. The field's numbers use OpenAI
ViT-B/32 (NeMo) or open_clip ViT-g-14 (Wen et al.); any transformers ``CLIPModel`` folder (or hub id where the machine
has network) works here — open_clip checkpoints are not read (convert them to a transformers folder), which keeps
open_clip out of the dependencies.

Preprocessing as CLIP's own processor: resize the shorter side to the model's image size (bicubic, antialiased),
centre crop, normalise with the processor's mean and std (the folder's preprocessor_config.json; CLIP's published
values when it has none). Images are resized in torch rather than PIL, so values may differ from the processor's in
the last digits. Captions longer than the text model's positions are truncated (as torchmetrics does).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import MemPruneError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipScorer:
    """Projected, normalised CLIP embeddings of images ([0, 1] RGB, N×3×H×W) and captions, and their CLIP score."""

    def __init__(self, model, tokenizer, mean=CLIP_MEAN, std=CLIP_STD, batch_size: int = 32, name: str = "CLIP"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.size = int(model.config.vision_config.image_size)
        self.max_length = int(model.config.text_config.max_position_embeddings)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.batch_size = batch_size
        self.description = f"CLIP score with {name} (100 * max(cos, 0), torchmetrics' definition)"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Shorter side to the model's size (bicubic, antialiased), centre crop, CLIP normalisation."""
        images = images.float().clamp(0, 1)
        height, width = images.shape[-2:]
        scale = self.size / min(height, width)
        size = (max(self.size, round(height * scale)), max(self.size, round(width * scale)))
        images = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (size[0] - self.size) // 2, (size[1] - self.size) // 2
        images = images[:, :, top : top + self.size, left : left + self.size]
        return (images - self.mean) / self.std

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        outputs = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.preprocess(images[start : start + self.batch_size]).to(self.device, self.dtype)
            vision = self.model.vision_model(pixel_values=pixels)
            outputs.append(self.model.visual_projection(vision.pooler_output).float().cpu())
        return F.normalize(torch.cat(outputs), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, captions: list[str]) -> torch.Tensor:
        outputs = []
        for start in range(0, len(captions), self.batch_size):
            tokens = self.tokenizer(list(captions[start : start + self.batch_size]), padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt").to(self.device)
            text = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask"))
            outputs.append(self.model.text_projection(text.pooler_output).float().cpu())
        return F.normalize(torch.cat(outputs), dim=-1)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def scores(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Per image: 100 * max(cos(image, its caption), 0); images (N, 3, H, W) in [0, 1], N captions."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images for {len(captions)} captions.")
        if len(images) == 0:
            return torch.zeros(0)
        cosine = (self.image_embeddings(images) * self.text_embeddings(captions)).sum(dim=-1)
        return 100 * cosine.clamp(min=0)


def _normalisation(folder: Path) -> tuple[tuple, tuple]:
    config = folder / "preprocessor_config.json"
    if config.is_file():
        values = json.loads(config.read_text())
        return tuple(values.get("image_mean", CLIP_MEAN)), tuple(values.get("image_std", CLIP_STD))
    return CLIP_MEAN, CLIP_STD


def load_clip_scorer(source: str, device: str | torch.device = "cpu", dtype=None) -> ClipScorer:
    """A ClipScorer from a transformers CLIPModel folder (config.json with model_type "clip", weights, tokenizer) or a
    hub id; refuse a missing folder or one that holds no CLIP model in one sentence."""
    from transformers import AutoTokenizer, CLIPModel

    folder = Path(source).expanduser()
    looks_local = folder.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1
    if looks_local:
        if not folder.is_dir():
            raise MemPruneError(f"--clip-model '{source}' is not a folder: give a transformers CLIPModel folder "
                                "(config.json, weights, tokenizer) or a hub id.")
        config = folder / "config.json"
        kind = json.loads(config.read_text()).get("model_type") if config.is_file() else None
        if kind != "clip":
            raise MemPruneError(f"--clip-model '{source}' holds no transformers CLIPModel (config.json model_type is "
                                f"{kind!r}, not 'clip').")
    try:
        model = CLIPModel.from_pretrained(str(folder) if looks_local else source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(folder) if looks_local else source)
    except (OSError, ValueError) as exc:
        raise MemPruneError(f"--clip-model '{source}' could not be loaded as a CLIPModel with its tokenizer "
                            f"({type(exc).__name__}).") from exc
    mean, std = _normalisation(folder) if looks_local else (CLIP_MEAN, CLIP_STD)
    return ClipScorer(model.to(device), tokenizer, mean, std, name=f"'{source}'")
