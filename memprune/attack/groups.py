"""The attack's false-positive floor: the prompt groups it runs on besides the memorized prompts.

DoRI's control is the same attack on images the model did not memorize: if it brings those back as often as the
memorized ones, "memorization under attack" measures the attacker, not the model. Two control groups, each a file of
captions with their target image (columns caption, image), attacked with the same settings and budget:

- ``same_style_control`` (``--controls``): same-style images each seen once in training (testbed default: its
  non-memorized same-style captions; off a testbed: --control when it has images);
- ``unseen`` (``--unseen``): same-style images never seen in training (testbed default: its unseen_same_style.csv,
  written by memprune.testbed.unseen).

Each group attacks its first ``num_controls`` rows (default: as many as memorized prompts are attacked, or the whole
file when shorter), so the groups' rates rest on the same number of prompts.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import MemPruneError
from ..prompts import PromptList, read_prompts, require_available

CONTROL_GROUP = "same_style_control"
UNSEEN_GROUP = "unseen"
NONE = "none"  # --controls none / --unseen none: no such group


def read_group(path: str, option: str, count: int | None, default_count: int) -> PromptList:
    """The first rows of a control file (caption, image), every one with an existing image; refused otherwise."""
    prompts = read_prompts(path)
    if not prompts.images:
        raise MemPruneError(f"{option} file '{path}' has no image column: the attack's control rows need each "
                            "caption's target image (columns caption,image).")
    require_available(count, len(prompts), f"--num-controls (for {option})", f"captions of '{path}'")
    keep = list(range(count if count is not None else min(default_count, len(prompts))))
    for i in keep:
        if not prompts.images[i]:
            raise MemPruneError(f"{option} file '{path}' row {i + 1} has no image: every control caption needs its "
                                "target image.")
        if not Path(prompts.image(i)).is_file():
            raise MemPruneError(f"{option} file '{path}' row {i + 1}: image '{prompts.images[i]}' does not exist.")
    return prompts.subset(keep)


def control_groups(controls: str | None, unseen: str | None, count: int | None,
                   default_count: int) -> dict[str, PromptList]:
    """The control groups by name (module docstring), in table order; a file given as "none" is left out."""
    groups = {}
    for name, path, option in ((CONTROL_GROUP, controls, "--controls"), (UNSEEN_GROUP, unseen, "--unseen")):
        if path is not None and path != NONE:
            groups[name] = read_group(path, option, count, default_count)
    return groups


def other_prompts(given: str | None, fallback: PromptList | None) -> list[str]:
    """The starts of ``--init other``, in order of preference: --init-prompt, else the captions of the same-style
    control file (a prompt never starts from itself: memprune.attack.run takes the first one that differs)."""
    if given is not None:
        return [given]
    if fallback is None or not len(fallback):
        raise MemPruneError("--init other needs a non-memorized prompt: give --init-prompt or --controls.")
    return list(fallback.prompts)


def other_prompt_for(prompt: str, candidates: list[str]) -> str:
    """The first candidate that is not `prompt` itself."""
    for candidate in candidates:
        if candidate != prompt:
            return candidate
    raise MemPruneError(f"--init other: no non-memorized prompt other than '{prompt}' to start from.")
