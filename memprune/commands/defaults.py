"""Defaults of the embedded testbed: the only place that names its caption files.

A testbed (the embedded one, or one `memprune testbed train` wrote) knows its memorized captions, its same-style
control, its held-out general captions and its training captions, so every prompt option defaults to them when the
model is a testbed; off a testbed the option is required.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import MemPruneError
from ..models import DEFAULT_MODEL
from ..prompts import PromptList, read_prompts, split_located, write_prompts

CAPTION_FILES = {
    "memorized": "memorized.csv",  # memorized captions with their training image
    "control": "non_memorized_same_style.csv",  # same style, each image seen once in training
    "general": "general_heldout.csv",  # general captions never seen in training (evaluate scores them)
    "general_train": "general_train.csv",  # general training captions (reference statistics, retain data)
    "unseen": "unseen_same_style.csv",  # same style, never seen in training (memprune.testbed.unseen; may be absent)
}


def model_or_default(model: str | None) -> str:
    return model or DEFAULT_MODEL


def testbed_captions(model: str | None) -> Path | None:
    """The captions/ folder of a testbed model, else None."""
    folder = Path(model_or_default(model)).expanduser() / "captions"
    return folder if (folder / CAPTION_FILES["memorized"]).is_file() else None


def testbed_file(model: str | None, role: str) -> str | None:
    """The testbed's file for `role` (a key of CAPTION_FILES), or None when the model is not a testbed."""
    captions = testbed_captions(model)
    return None if captions is None else str(captions / CAPTION_FILES[role])


def is_testbed(model: str | None) -> bool:
    return testbed_captions(model) is not None


def file_or_testbed_default(model: str | None, given: str | None, role: str, option: str) -> str:
    """`given`, else the testbed's file for `role`; off a testbed the option is required."""
    if given is not None:
        return given
    default = testbed_file(model, role)
    if default is None:
        raise MemPruneError(f"{option} is required when --model is not a memprune testbed.")
    return default


def split_testbed_memorized(model: str | Path, out: str | Path, size: int = 10,
                            seed: int = 0) -> tuple[PromptList, PromptList]:
    """A testbed's memorized captions split by split_located; the located part goes to out/prompts_used.csv,
    so that `evaluate --exclude-prompts` scores the same held-out rest (the scripts' sweeps use it)."""
    located, held_out = split_located(read_prompts(Path(model) / "captions" / CAPTION_FILES["memorized"]), size,
                                      seed=seed)
    write_prompts(located.prompts, Path(out) / "prompts_used.csv")
    return located, held_out


BENCHMARK_PRESETS = ("testbed", "field")  # arms files shipped in memprune/benchmark_presets/


def benchmark_preset(name: str) -> tuple[str, str]:
    """(text, where it comes from) of a shipped arms file of `memprune benchmark --preset NAME`."""
    from importlib.resources import files

    if name not in BENCHMARK_PRESETS:
        raise MemPruneError(f"Unknown benchmark preset '{name}': use one of {', '.join(BENCHMARK_PRESETS)}.")
    resource = files("memprune") / "benchmark_presets" / f"{name}.toml"
    return resource.read_text(), f"preset '{name}'"
