"""Load a pipeline (local folder, hub id or the embedded testbed) and find its FeedForward layers."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from .errors import MemPruneError

if TYPE_CHECKING:  # an nn.Module with diffusers' `config` (Any to mypy: diffusers is not followed, see pyproject)
    from diffusers import ModelMixin

# The embedded memorization testbed shipped with the repository (see data/testbed/MODEL_CARD.md).
DEFAULT_MODEL = str(Path(__file__).resolve().parent.parent / "data" / "testbed")



def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise MemPruneError(f"Unknown device '{device}': use auto, cpu, cuda or cuda:N.") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise MemPruneError(f"Device '{device}' was asked for but CUDA is not available: use --device cpu.")
    return resolved


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "/", "~"))


def check_model_source(model: str) -> None:
    """Fail early, with one sentence, on a model argument that cannot be a diffusers pipeline."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MemPruneError(f"Model '{model}' is a file, not a diffusers pipeline folder.")
        if not (path / "model_index.json").is_file():
            raise MemPruneError(
                f"Model folder '{model}' has no model_index.json: it is not a diffusers pipeline "
                "(save one with pipeline.save_pretrained)."
            )
        return
    if not _looks_like_hub_id(model):
        raise MemPruneError(f"Model '{model}' does not exist: give a diffusers pipeline folder or a hub id (org/name).")


def local_model_folder(model: str) -> Path | None:
    """The local folder of a pipeline: the folder itself, or the hub cache's snapshot of an id (never downloads)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception:  # not cached, or not a hub id: nothing local to read
        return None


def load_pipeline(model: str | None = None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  components: dict | None = None):
    """Load any diffusers text-to-image pipeline; weights as safetensors, never remote code. `components`: loaded
    components to use instead of loading the folder's own (memprune.evaluation.sharing)."""
    from diffusers import DiffusionPipeline

    model = model or DEFAULT_MODEL
    check_model_source(model)
    kwargs: dict[str, object] = {"use_safetensors": True, **(components or {})}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        pipe = DiffusionPipeline.from_pretrained(model, **kwargs)
    except Exception as exc:  # diffusers raises many types; all mean "cannot load this"
        raise MemPruneError(f"Could not load a diffusers pipeline from '{model}': {str(exc).splitlines()[0]}") from exc
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None  # it would replace memorized copies by black images and hide them
    pipe.set_progress_bar_config(disable=True)
    pipe.to(torch.device(device) if isinstance(device, str) else device)
    denoiser(pipe)  # fail now, with a clear message, on a pipeline without FeedForward layers
    return pipe


def denoiser(pipe) -> ModelMixin:
    """The network called once per sampling step: `unet` (SD 1.x/2.x/SDXL) or `transformer` (DiT-style)."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            if not find_feedforwards(module):
                raise MemPruneError(f"The pipeline's {name} has no FeedForward layers: memprune has nothing to record.")
            return module
    raise MemPruneError("The pipeline has neither a unet nor a transformer: "
                        "it is not a text-to-image diffusion pipeline.")


def pipeline_modules(pipe) -> list[nn.Module]:
    """Every torch module of a pipeline (its components: denoiser, text encoders, VAE, ...)."""
    return [m for m in getattr(pipe, "components", {}).values() if isinstance(m, nn.Module)]


def find_feedforwards(model: nn.Module) -> dict[str, nn.Module]:
    """All diffusers FeedForward modules by dotted name, in module order (found by type, never by name)."""
    from diffusers.models.attention import FeedForward

    return {name: module for name, module in model.named_modules() if isinstance(module, FeedForward)}


def output_linear(feedforward: nn.Module) -> nn.Linear:
    """The FeedForward's last nn.Linear (H -> C): its input is the recorded activation."""
    net = feedforward.net
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)] if isinstance(net, nn.Module) else []
    if not linears:
        raise MemPruneError("A FeedForward layer has no nn.Linear in its net: unsupported architecture.")
    return linears[-1]


def output_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: output_linear(ff) for name, ff in find_feedforwards(model).items()}


def layer_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Weight shapes of the FeedForward output Linears (what `model_identity` fingerprints; keep it FF-only so the
    fingerprint of existing masks files does not change)."""
    return {name: list(linear.weight.shape) for name, linear in output_linears(model).items()}


def _attention_classes() -> tuple[type[nn.Module], ...]:
    from diffusers.models.attention_processor import Attention

    classes = [Attention]
    try:  # newer diffusers: attention classes of DiT-style transformers share this mixin
        from diffusers.models.attention import AttentionModuleMixin
    except ImportError:
        return tuple(classes)
    return (*classes, AttentionModuleMixin)


def find_cross_attentions(model: nn.Module) -> dict[str, nn.Module]:
    """Every diffusers attention module that attends to the text (is_cross_attention), by dotted name, found by type."""
    classes = _attention_classes()
    return {name: module for name, module in model.named_modules()
            if isinstance(module, classes) and getattr(module, "is_cross_attention", False)
            and isinstance(getattr(module, "to_v", None), nn.Linear)}


def value_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The value projection (to_v, text width -> inner width) of every cross-attention, keyed by its module name
    (e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v`): NeMo's neurons are its output units."""
    # find_cross_attentions keeps only attentions whose to_v is an nn.Linear
    return {f"{name}.to_v": cast(nn.Linear, attention.to_v) for name, attention in find_cross_attentions(model).items()}


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear a masks file may address: FeedForward output Linears (keyed by the FeedForward's name, as masks
    files always were) and cross-attention value Linears (keyed by their own name). The key sets cannot collide."""
    return {**output_linears(model), **value_linears(model)}


def prunable_layer_shapes(model: nn.Module) -> dict[str, list[int]]:
    return {name: list(linear.weight.shape) for name, linear in prunable_linears(model).items()}


def model_identity(model_source: str, pipe) -> dict:
    """What a masks file records about the model it was made for."""
    net = denoiser(pipe)
    shapes = layer_shapes(net)
    fingerprint = hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "source": str(model_source),
        "denoiser_class": type(net).__name__,
        "pipeline_class": type(pipe).__name__,
        "layer_shapes_sha256": fingerprint,
    }
