"""Editing methods: one module per method, sharing one small interface.

Every method module defines ``METHOD = MethodInfo(...)`` and, by its kind, one entry point:

- ``weight_edit``: ``edit(pipe, settings, **inputs) -> Masks``. A weight edit only *selects* weights; it never
  changes the pipeline it is given. ``memprune.prune.apply_masks`` zeroes the selection and ``save_pruned``
  writes the edited pipeline, the same for every weight edit (Wanda, NeMo, UniForget, a random control).
- ``mitigation``: ``wrap(pipe, settings) -> pipeline``. A generation-time mitigation changes no weight; it
  returns a callable with the diffusers pipeline call signature that ``memprune.generate`` uses in place of
  the pipeline (Wen et al.). Its cost is paid on every image, so evaluate times it beside the others.
- ``finetune``: ``finetune(pipe, settings, **inputs) -> dict[str, Tensor]``, a weight delta per parameter name
  that is added to the pipeline and saved (gradient projection, DoCo).

``available()`` discovers the modules of this package, so adding a method is one new module here plus its
command-line option; nothing else needs to list it.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from types import ModuleType

from ..errors import MemPruneError

KINDS = ("weight_edit", "mitigation", "finetune")
ENTRY_POINTS = {"weight_edit": "edit", "mitigation": "wrap", "finetune": "finetune"}


@dataclass(frozen=True)
class MethodInfo:
    name: str  # what the command line calls it (--method NAME)
    kind: str  # one of KINDS
    summary: str  # one line: the paper and what the method does
    reference: str = ""  # citation

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Method kind must be one of {KINDS}, got {self.kind!r}.")


def available() -> dict[str, ModuleType]:
    """Method name -> module, for every module of this package that defines METHOD."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        method = getattr(module, "METHOD", None)
        if isinstance(method, MethodInfo):
            found[method.name] = module
    return found


def get(name: str, kind: str | None = None) -> ModuleType:
    """The module of a method by name, checked to be of `kind` (when given) and to define its entry point."""
    methods = available()
    if name not in methods:
        raise MemPruneError(f"Unknown method '{name}': use one of {', '.join(sorted(methods))}.")
    module = methods[name]
    if kind is not None and module.METHOD.kind != kind:
        raise MemPruneError(f"Method '{name}' is a {module.METHOD.kind.replace('_', ' ')}, not a {kind.replace('_', ' ')}.")
    entry = ENTRY_POINTS[module.METHOD.kind]
    if not callable(getattr(module, entry, None)):
        raise MemPruneError(f"Method module '{module.__name__}' defines no {entry}() for its kind {module.METHOD.kind}.")
    return module


def names(kind: str) -> list[str]:
    return sorted(name for name, module in available().items() if module.METHOD.kind == kind)
