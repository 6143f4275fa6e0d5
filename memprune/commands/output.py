"""The opening every command repeats: protect the sources, refuse an existing output, write atomically with run.json."""
from __future__ import annotations

from pathlib import Path

from ..runinfo import Timer, atomic_output_dir, check_output_dir, write_run_json

__all__ = ["Timer", "atomic_output_dir", "check_output_dir", "protected_sources", "refuse_output", "write_run_json"]


def protected_sources(*sources) -> list[str]:
    """The sources that are local paths: an output must never be, contain or lie in one of them."""
    return [str(source) for source in sources if source and Path(source).exists()]


def refuse_output(out, overwrite: bool, *sources) -> list[str]:
    """Refuse an existing --out (unless --overwrite) or one overlapping a source, before any work; return the
    protected sources for the atomic write that follows."""
    protected = protected_sources(*sources)
    check_output_dir(out, overwrite, protected)
    return protected
