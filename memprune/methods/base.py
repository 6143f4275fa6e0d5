"""What a method module declares about itself (``METHOD = MethodInfo(...)``) and the interface its kind promises.

Its own module so that method modules import it without importing the registry (memprune.methods), which imports
them."""
from __future__ import annotations

from dataclasses import dataclass

KINDS = ("weight_edit", "mitigation", "finetune")
ENTRY_POINTS = {"weight_edit": ("edit", "settings_from_options"), "mitigation": ("wrap",),
                "finetune": ("train", "settings_from_options")}
STAGES = ("locate", "prune")
NEEDS = ("prompts", "statistics")


@dataclass(frozen=True)
class MethodInfo:
    name: str  # what the command line calls it (--method NAME)
    kind: str  # one of KINDS
    summary: str  # one line: the paper and what the method does
    reference: str = ""  # citation
    stage: str = "locate"  # weight edits: the command that runs the edit (STAGES)
    needs: str = "prompts"  # weight edits run by locate: what edit() is given (NEEDS)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Method kind must be one of {KINDS}, got {self.kind!r}.")
        if self.stage not in STAGES or self.needs not in NEEDS:
            raise ValueError(f"Method stage must be one of {STAGES} and needs one of {NEEDS}.")
