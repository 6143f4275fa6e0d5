"""A CLIP-style BPE tokenizer trained offline on the testbed captions.

A hand-built BPE with conflicting merges split words and silently truncated captions (see the
testbed notes). Here BPE is learned properly (most frequent pair first, until every word is one
symbol) on the caption words as CLIP's own normalizer and pre-tokenizer (from `tokenizers`) split
them, so every caption word is a single token; the full byte alphabet (with and without the
end-of-word suffix) is added so any text tokenizes without unknown tokens. The `tokenizers`
BpeTrainer gave the same vocabulary with different ids in every process (ties broken by hash
order), so the merges are learned here with deterministic tie-breaking. The result is a stock
`transformers.CLIPTokenizer`.
"""
from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
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


def learn_bpe(words: dict[str, int]) -> list[tuple[str, str]]:
    """Classic BPE on word counts, merging until every word is one symbol.

    Ties in pair frequency are broken by the pair itself, so the result is the same in every
    process (the `tokenizers` trainer breaks ties by hash order, which changes run to run)."""
    seqs = {w: list(w[:-1]) + [w[-1] + EOW] for w in words}
    pair_count: dict[tuple[str, str], int] = {}
    pair_words: dict[tuple[str, str], set[str]] = {}

    def add(word: str, sign: int) -> None:
        sym = seqs[word]
        for p in zip(sym, sym[1:], strict=False):
            pair_count[p] = pair_count.get(p, 0) + sign * words[word]
            if sign > 0:
                pair_words.setdefault(p, set()).add(word)

    for w in words:
        add(w, 1)
    merges: list[tuple[str, str]] = []
    while True:
        live = [(c, p) for p, c in pair_count.items() if c > 0]
        if not live:
            return merges
        best = min(live, key=lambda cp: (-cp[0], cp[1]))[1]
        merges.append(best)
        for w in sorted(pair_words.pop(best, ())):
            add(w, -1)
            sym, out, i = seqs[w], [], 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == best:
                    out.append(sym[i] + sym[i + 1])
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            seqs[w] = out
            add(w, 1)
        pair_count.pop(best, None)


def train_clip_tokenizer(captions: list[str], model_max_length: int = 24) -> CLIPTokenizer:
    """Learn BPE on the words of `captions` until every word is whole; wrap as a `CLIPTokenizer`."""
    backend = _clip_like_backend()
    words: dict[str, int] = {}
    for cap in captions:
        for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(cap)):
            words[w] = words.get(w, 0) + 1
    merges = learn_bpe(words)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # Every single byte, alone and word-final, so arbitrary text never maps to the unknown token;
    # then every merged symbol. Canonical order: the vocabulary is the same in every run.
    tokens = sorted(set(alphabet)) + sorted(ch + EOW for ch in alphabet)
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    vocab = {t: i for i, t in enumerate([BOS, EOS] + tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
