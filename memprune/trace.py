"""One hook utility for every module that watches or changes a forward pass (after baukit's Trace/TraceDict).

`Trace` is a context manager over named modules (found by name or by type with `find_modules`, or given as a
dict). Per module it can

- retain the latest input (`retain_input`: positional and keyword arguments) and/or output (`retain_output`),
- read or edit the input (`edit_input(inputs, name)`) and the output (`edit_output(output, name)`): a function that
  returns None leaves the value as it is, so an observer (a recorder) is an edit that returns None,
- stop the forward pass at the first traced call (`stop=True`): it raises `StopForward` as soon as that call has
  given what the trace asks for (before the module runs unless its output is retained or edited, after it
  otherwise), and the `with` block swallows it (only its own), so
  ``with Trace(net, stop=True, retain_output=True) as t: pipe(...)`` runs the pipeline up to its first denoiser call.

On exit it removes exactly the hooks it added (also after an exception); other hooks on the same modules stay.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, TypeVar

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a `Trace` with stop=True after the first traced call; its own `with` block swallows it."""

    def __init__(self, trace: Trace):
        super().__init__("forward pass stopped after the first traced call")
        self.trace = trace


class Inputs(NamedTuple):
    """A module call's positional and keyword arguments (a pre-hook with kwargs may return one to replace them)."""

    args: tuple
    kwargs: dict


EditInput = Callable[[Inputs, str], "Inputs | None"]
EditOutput = Callable[[Any, str], Any]


def find_modules(root: nn.Module, names: Iterable[str] | None = None,
                 types: type | tuple[type, ...] | None = None) -> dict[str, nn.Module]:
    """Submodules of `root` by dotted name (in the order given; "" is `root`) and/or by type (in module order)."""
    found: dict[str, nn.Module] = {}
    if names is not None:
        for name in names:
            found[name] = root.get_submodule(name)
    if types is not None:
        found.update({name: module for name, module in root.named_modules() if isinstance(module, types)})
    return found


def _detached(value):
    if torch.is_tensor(value):
        return value.detach()
    if isinstance(value, tuple):
        return type(value)(*map(_detached, value)) if hasattr(value, "_fields") else tuple(map(_detached, value))
    if isinstance(value, list):
        return [_detached(v) for v in value]
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


TraceT = TypeVar("TraceT", bound="Trace")  # `with Recorder(...) as r` gives the subclass


class Trace:
    """Context manager hooking `modules` (one module, traced as "", or a name -> module mapping); see the module
    docstring. `input[name]` / `output[name]` hold the latest retained call of each module (detached tensors unless
    detach=False)."""

    def __init__(self, modules: nn.Module | Mapping[str, nn.Module], *, retain_input: bool = False,
                 retain_output: bool = False, edit_input: EditInput | None = None,
                 edit_output: EditOutput | None = None, stop: bool = False, detach: bool = True):
        self.modules = {"": modules} if isinstance(modules, nn.Module) else dict(modules)
        self.retain_input, self.retain_output, self.stop, self.detach = retain_input, retain_output, stop, detach
        self.edit_input, self.edit_output = edit_input, edit_output
        self.input: dict[str, Inputs] = {}
        self.output: dict[str, Any] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def _needs_output(self) -> bool:
        return self.retain_output or self.edit_output is not None

    def _keep(self, value):
        return _detached(value) if self.detach else value

    def _pre_hook(self, name: str):
        def hook(module, args, kwargs):
            result = None
            if self.edit_input is not None:
                result = self.edit_input(Inputs(args, kwargs), name)
                if result is not None:
                    args, kwargs = result
            if self.retain_input:
                self.input[name] = Inputs(self._keep(args), self._keep(kwargs))
            if self.stop and not self._needs_output:
                raise StopForward(self)
            return None if result is None else (args, kwargs)
        return hook

    def _post_hook(self, name: str):
        def hook(module, args, output):
            result = None
            if self.edit_output is not None:
                result = self.edit_output(output, name)
                if result is not None:
                    output = result
            if self.retain_output:
                self.output[name] = self._keep(output)
            if self.stop:
                raise StopForward(self)
            return result
        return hook

    def __enter__(self: TraceT) -> TraceT:
        try:
            for name, module in self.modules.items():
                if self.edit_input is not None or self.retain_input or (self.stop and not self._needs_output):
                    self._handles.append(module.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True))
                if self._needs_output:
                    self._handles.append(module.register_forward_hook(self._post_hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Remove exactly the hooks this trace added (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, exc_type, exc, traceback) -> bool:
        self.remove()
        return isinstance(exc, StopForward) and exc.trace is self
