"""Evaluate's inputs: where each edited model comes from, and the prompt files read into groups.

Groups (the `group` column of metrics.csv):
- ``memorized``: the --memorized prompts; ``memorized_held_out``: those of them NOT used for locating
  (captions absent from --exclude-prompts, a locate prompts_used.csv) — the generalisation claim;
- ``non_memorized``: the --reference prompts; on the embedded testbed without --reference, the pool of
  the two non-memorized groups below (no extra generation);
- ``same_style_control`` (--control; testbed default: non-memorized emoji, each seen once in training)
  and ``general`` (--general; testbed default: held-out shape captions with their attributes).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import MemPruneError
from ..models import check_model_source
from ..prompts import PromptList, read_prompts
from ..prune import PRUNE_INFO
from ..readback import read_json_object
from .settings import PROMPT_ROLES, EvaluateSettings

# --------------------------------------------------------------------------------------------- edited model

def same_model(a: str, b: str) -> bool:
    """Local folders compare by resolved path, hub ids by name."""
    path_a, path_b = Path(a).expanduser(), Path(b).expanduser()
    if path_a.exists() or path_b.exists():
        return path_a.exists() and path_b.exists() and path_a.resolve() == path_b.resolve()
    return a.strip().rstrip("/") == b.strip().rstrip("/")


def check_edited(model: str, edited: str) -> str:
    """Refuse an edited model whose memprune.json names another base; return a note on what was checked."""
    check_model_source(edited)
    info_path = Path(edited).expanduser() / PRUNE_INFO
    if not info_path.is_file():
        return f"Edited model '{edited}' has no {PRUNE_INFO}: its base model could not be checked."
    source = read_json_object(info_path, "re-run memprune prune").get("source")
    if source is None:
        raise MemPruneError(f"'{info_path}' is not a valid memprune.json (no 'source'): re-run memprune prune.")
    if not same_model(str(source), str(model)):
        raise MemPruneError(
            f"Edited model '{edited}' was edited from '{source}', not from --model '{model}': "
            f"evaluate it against its own base (--model {source})."
        )
    return f"Edited model '{edited}' was edited from '{source}' (= --model)."


# --------------------------------------------------------------------------------------------- prompt groups

@dataclass
class Group:
    name: str
    members: list[tuple[str, int]]  # (source, prompt index)


def read_sources(settings: EvaluateSettings) -> tuple[dict[str, PromptList], dict[str, str]]:
    """Prompt files by role (memorized, reference, control, general); a file given twice is read (and generated) once.

    Returns the prompt lists by source key and, per role, the source key it uses.
    """
    sources: dict[str, PromptList] = {}
    by_path: dict[Path, str] = {}
    roles: dict[str, str] = {}
    for role in PROMPT_ROLES:
        path = settings.prompt_file(role)
        if path is None:
            continue
        resolved = Path(path).expanduser().resolve()
        if resolved in by_path:
            roles[role] = by_path[resolved]
            continue
        sources[role] = read_prompts(path)
        by_path[resolved] = roles[role] = role
    for prompts in sources.values():
        check_training_images(prompts)
    return sources, roles


def check_training_images(prompts: PromptList) -> None:
    """Every named training image must exist (read_prompts resolves them; see prompts._image_path)."""
    for index, image in enumerate(prompts.images or []):
        if image and not Path(image).is_file():
            raise MemPruneError(f"Prompt file '{prompts.source}' row {index + 1}: "
                                f"training image '{image}' does not exist.")


def build_groups(settings: EvaluateSettings, sources: dict[str, PromptList],
                 roles: dict[str, str]) -> tuple[dict[str, Group], list[str]]:
    """The groups of the module docstring, in GROUPS order, and notes on what could not be formed."""
    notes = []
    memorized = sources[roles["memorized"]]
    groups = {"memorized": Group("memorized", [(roles["memorized"], i) for i in range(len(memorized))])}
    if settings.exclude_prompts is not None:
        used = set(read_prompts(settings.exclude_prompts).prompts)
        held_out = [i for i, caption in enumerate(memorized.prompts) if caption not in used]
        if len(held_out) == len(memorized):
            raise MemPruneError(
                f"None of the captions in '{settings.exclude_prompts}' is a memorized prompt of '{memorized.source}': "
                "was it written by locate on another --memorized file?"
            )
        if held_out:
            groups["memorized_held_out"] = Group("memorized_held_out", [(roles["memorized"], i) for i in held_out])
        else:
            notes.append("Every memorized prompt was used for locating: no memorized_held_out group.")

    def members(role: str) -> list[tuple[str, int]]:
        return [(roles[role], i) for i in range(len(sources[roles[role]]))]

    if "reference" in roles:
        groups["non_memorized"] = Group("non_memorized", members("reference"))
    else:
        pooled = [m for role in ("control", "general") if role in roles for m in members(role)]
        groups["non_memorized"] = Group("non_memorized", pooled)
    if "control" in roles:
        groups["same_style_control"] = Group("same_style_control", members("control"))
    if "general" in roles:
        groups["general"] = Group("general", members("general"))
    return groups, notes


def calibration_group(groups: dict[str, Group]) -> str:
    """The non-memorized group that calibrates the copy threshold (and Wen's default target)."""
    return "same_style_control" if "same_style_control" in groups else "non_memorized"
