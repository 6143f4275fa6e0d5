"""Helpers every test module shares: invoke the CLI in-process and check a clean refusal."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from click.testing import CliRunner, Result
from PIL import Image

from memprune.cli import main


def run(*args) -> Result:
    """Invoke `memprune ARGS...` in-process; every argument is passed as its str()."""
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_refused(result: Result, message: str) -> None:
    """A refusal: non-zero exit, `message` in the output, no traceback, no exception other than click's exit."""
    assert result.exit_code != 0, result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


def write_benchmark_inputs(folder: Path) -> Path:
    """Three memorized captions with 16-pixel seeded random images (memorized.csv) and two reference captions
    (reference.txt) in `folder`: the inputs of the benchmark tests."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir()
    for name in ("circle", "cat", "square"):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(folder / "images" / f"{name}.png")
    (folder / "memorized.csv").write_text("caption,image\na red circle,images/circle.png\nthe cat,images/cat.png\n"
                                          "a blue square,images/square.png\n")
    (folder / "reference.txt").write_text("the green dog\na yellow star\n")
    return folder
