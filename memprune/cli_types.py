"""Click parameter types for the command line: floats that refuse NaN and infinity.

`float("nan")` and `float("inf")` parse, and NaN passes every range check (every comparison with it is false), so
`--threshold nan` would otherwise run and write metrics with a NaN threshold. Use `FINITE_FLOAT` in place of
`type=float` and `FiniteFloatRange(...)` in place of `click.FloatRange(...)`; the refusal is click's usual one line:
"Invalid value for '--threshold': 'nan' is not a finite number."
"""
from __future__ import annotations

import math
from typing import Any

import click

from .errors import MemPruneError


def _finite(value: float) -> bool:
    return math.isfinite(value)


class FiniteFloat(click.types.FloatParamType):
    """A float option that refuses nan, inf and -inf."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        number = super().convert(value, param, ctx)
        if not _finite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number

    def __repr__(self) -> str:
        return "FINITE_FLOAT"


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan, inf and -inf (NaN would pass its bounds check)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        number = click.FLOAT.convert(value, param, ctx)
        if not _finite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


FINITE_FLOAT = FiniteFloat()


def require_finite(value: float, option: str) -> float:
    """The same check for values that reach the library without click (settings built in code, read from JSON)."""
    if not _finite(float(value)):
        raise MemPruneError(f"{option} must be a finite number, got {value}.")
    return value
