"""The attack perturbs the base model's text embeddings, so every attacked model must share its tokenizers and
text encoders: a fingerprint of that text side, read from a loaded pipeline or (before the long work) from a folder."""
from __future__ import annotations

import hashlib
import json
import types
from pathlib import Path

from ..errors import MemPruneError
from ..readback import read_json_object


def _state_hash(module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


def text_fingerprint(pipe) -> dict[str, str]:
    """A hash per tokenizer (vocabulary and merges) and per text encoder (config without paths, and weights)."""
    prints = {}
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is not None:
            content = {"vocab": sorted(tokenizer.get_vocab().items()),
                       "merges": [list(m) for m in getattr(tokenizer, "bpe_ranks", {})],
                       "max_length": tokenizer.model_max_length}
            prints[name] = hashlib.sha256(json.dumps(content, default=str).encode()).hexdigest()
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            config = {k: v for k, v in encoder.config.to_dict().items()
                      if not k.startswith("_") and k != "transformers_version"}
            config_json = json.dumps(config, sort_keys=True, default=str)
            prints[f"{name}_config"] = hashlib.sha256(config_json.encode()).hexdigest()
            prints[f"{name}_weights"] = _state_hash(encoder)
    return prints


TEXT_COMPONENTS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")


def text_side(source: str) -> types.SimpleNamespace | None:
    """Only the tokenizers and text encoders of a local pipeline folder (for checking before the long work), or None
    for a hub id (then the check runs when the model is loaded)."""
    import transformers

    index_path = Path(source).expanduser() / "model_index.json"
    if not index_path.is_file():
        return None
    index = read_json_object(index_path, "it is not a diffusers pipeline folder")
    parts = {}
    for name in TEXT_COMPONENTS:
        entry = index.get(name)
        if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            continue
        cls = getattr(transformers, entry[1], None)
        if cls is None:
            return None
        kwargs = {} if name.startswith("tokenizer") else {"use_safetensors": True}
        try:
            parts[name] = cls.from_pretrained(str(index_path.parent), subfolder=name, **kwargs)
        except Exception as exc:  # transformers raises many types; all mean "cannot read this component"
            raise MemPruneError(f"Could not load the {name} of '{source}': {str(exc).splitlines()[0]}") from exc
    return types.SimpleNamespace(**parts)


def check_same_text_side(base: dict[str, str], edited: dict[str, str], folder: str) -> None:
    for key in sorted(set(base) | set(edited)):
        if base.get(key) != edited.get(key):
            part = key.replace("_config", " configuration").replace("_weights", " weights")
            raise MemPruneError(f"Edited model '{folder}' has another {part} than --model: "
                                "the attack perturbs the base "
                                "model's text embeddings, so both must share the tokenizer and text encoder.")

