"""The opening every command repeats: protect the sources, refuse an existing output, write atomically with run.json."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from ..runinfo import Timer, atomic_output_dir, check_output_dir, write_run_json

__all__ = ["ProgressLog", "Timer", "atomic_output_dir", "check_output_dir", "protected_sources", "refuse_output",
           "write_run_json"]


def protected_sources(*sources) -> list[str]:
    """The sources that are local paths: an output must never be, contain or lie in one of them."""
    return [str(source) for source in sources if source and Path(source).exists()]


def refuse_output(out, overwrite: bool, *sources) -> list[str]:
    """Refuse an existing --out (unless --overwrite) or one overlapping a source, before any work; return the
    protected sources for the atomic write that follows."""
    protected = protected_sources(*sources)
    check_output_dir(out, overwrite, protected)
    return protected


class ProgressLog:
    """A command's `log` that remembers the lines it printed while the run went on (the similarity backend, the copy
    threshold, the Wen target), so that the summary printed at the end leaves them out instead of repeating them.
    Without a `log` nothing is printed and the summary keeps every line."""

    NOTE = "Note: "

    def __init__(self, log: Callable[[str], object] | None):
        self.log = log
        self.said: set[str] = set()

    def __call__(self, line: str) -> None:
        if self.log is not None:
            self.said.add(line)
            self.log(line)

    def unsaid(self, lines: Iterable[str]) -> list[str]:
        """`lines` less those already printed (a "Note: X" line counts as printed when X was)."""
        return [line for line in lines if line not in self.said and line.removeprefix(self.NOTE) not in self.said]
