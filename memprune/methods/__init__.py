"""Editing methods: one module per method, one registry, one small interface per kind.

Every method module defines ``METHOD = MethodInfo(...)`` and, by its kind, the entry points the commands call
(``ENTRY_POINTS``; ``register`` checks them, so the declared interface is the called one):

- ``weight_edit``: ``edit(pipe, settings, **inputs) -> Masks`` and ``settings_from_options(options) -> settings``.
  A weight edit only *selects* weights; it never changes the pipeline it is given. ``memprune.prune.apply_masks``
  zeroes the selection and ``save_pruned`` writes the edited pipeline, the same for every weight edit (Wanda,
  NeMo, UniForget, a random control). ``settings_from_options`` turns the command's options (a dict named like the
  CLI options, underscores for dashes) into the method's settings; the method's own option checks live there.
  ``METHOD.stage`` says which command runs the edit: ``locate`` (it writes a masks folder that ``prune --masks``
  applies) or ``prune`` (it selects just before pruning, e.g. UniForget's gates). ``METHOD.needs`` says what
  ``locate`` hands ``edit``: ``prompts`` (``memorized=``, ``reference=`` prompt lists and ``meta=``) or
  ``statistics`` (``memorized_stats=``, ``reference_stats=`` recorded by ``memprune.locate``; Wanda).
- ``mitigation``: ``wrap(pipe, settings) -> pipeline``. A generation-time mitigation changes no weight; it
  returns a callable with the diffusers pipeline call signature that ``memprune.generate`` uses in place of
  the pipeline (Wen et al.). Its cost is paid on every image, so evaluate times it beside the others.
- ``finetune``: ``settings_from_options(options) -> method settings`` and
  ``train(pipe, settings, method_settings, **inputs) -> FinetuneResult`` (the weight delta per parameter name, its
  loss history and what memprune.json records), run by the shared loop of ``memprune.finetune`` (gradient
  projection, DoCo, the plain control).

The methods of this package are registered by module name (imported only when asked for); ``register`` adds one
from anywhere else, after which it appears in every ``--method`` choice of its kind.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import MemPruneError
from .base import ENTRY_POINTS, KINDS, NEEDS, STAGES, MethodInfo

__all__ = ["ENTRY_POINTS", "KINDS", "NEEDS", "STAGES", "MethodInfo", "available", "get", "names", "register"]

# modules of this package
BUILTIN = ("wanda", "nemo", "nemo_prompt", "uniforget", "wen", "gradproj", "doco", "plain", "adversarial",
           "robust_wanda")

_registered: dict[str, ModuleType] = {}


def register(module) -> None:
    """Register a method module (or any object with METHOD and its kind's entry points) under METHOD.name."""
    method = getattr(module, "METHOD", None)
    if not isinstance(method, MethodInfo):
        raise MemPruneError(f"'{getattr(module, '__name__', module)}' defines no METHOD = MethodInfo(...).")
    missing = [entry for entry in ENTRY_POINTS[method.kind] if not callable(getattr(module, entry, None))]
    if missing:
        raise MemPruneError(f"Method module '{getattr(module, '__name__', module)}' defines no {missing[0]}() for its "
                            f"kind {method.kind}.")
    _registered[method.name] = module


def _load_builtins() -> None:
    for name in BUILTIN:
        if name not in _registered:
            register(importlib.import_module(f"{__name__}.{name}"))


def available() -> dict[str, ModuleType]:
    """Method name -> module, for every registered method (this package's and those registered from outside)."""
    _load_builtins()
    return dict(_registered)


def get(name: str, kind: str | None = None) -> ModuleType:
    """The module of a method by name, checked to be of `kind` (when given)."""
    methods = available()
    if name not in methods:
        raise MemPruneError(f"Unknown method '{name}': use one of {', '.join(sorted(methods))}.")
    module = methods[name]
    if kind is not None and module.METHOD.kind != kind:
        raise MemPruneError(f"Method '{name}' is a {module.METHOD.kind.replace('_', ' ')}, "
                            f"not a {kind.replace('_', ' ')}.")
    return module


def names(kind: str, stage: str | None = None) -> list[str]:
    """The registered methods of `kind` (and, for weight edits, of `stage`), sorted."""
    return sorted(name for name, module in available().items()
                  if module.METHOD.kind == kind and (stage is None or module.METHOD.stage == stage))
