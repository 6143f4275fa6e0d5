"""A CLIP-style BPE tokenizer trained offline on the testbed captions.

A hand-built BPE with conflicting merges split words and silently truncated captions (see the
testbed notes). Training BPE with the `tokenizers` package, with CLIP's own normalizer and
pre-tokenizer, on the caption corpus keeps every caption word a single token; the full byte
alphabet (with and without the end-of-word suffix) is added so any text tokenizes without
unknown tokens. The result is a stock `transformers.CLIPTokenizer`.
"""
from __future__ import annotations

import json

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EOW = "</w>"


def _clip_like_backend() -> Tokenizer:
    """An untrained BPE with the same normalizer and pre-tokenizer as `CLIPTokenizer` builds."""
    ref = CLIPTokenizer(vocab={BOS: 0, EOS: 1}, merges=[])
    backend = Tokenizer(models.BPE(end_of_word_suffix=EOW, continuing_subword_prefix=""))
    backend.normalizer = ref.backend_tokenizer.normalizer
    backend.pre_tokenizer = ref.backend_tokenizer.pre_tokenizer
    return backend


def pre_tokenize(text: str) -> list[str]:
    """The words CLIP's pre-tokenizer splits `text` into (each should become one token)."""
    backend = _clip_like_backend()
    normalized = backend.normalizer.normalize_str(text)
    return [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)]


def train_clip_tokenizer(captions: list[str], model_max_length: int = 24) -> CLIPTokenizer:
    """Train BPE on `captions` until every word is whole; wrap it as a `CLIPTokenizer`."""
    backend = _clip_like_backend()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000,  # no cap: merge until every word of the corpus is one token
        min_frequency=1,
        special_tokens=[BOS, EOS],
        initial_alphabet=alphabet,
        end_of_word_suffix=EOW,
        show_progress=False,
    )
    backend.train_from_iterator(sorted(set(captions)), trainer)
    model = json.loads(backend.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    # Every single byte, alone and word-final, so arbitrary text never maps to the unknown token.
    for ch in sorted(alphabet):
        for tok in (ch, ch + EOW):
            if tok not in vocab:
                vocab[tok] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    return tok
