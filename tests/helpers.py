"""Helpers every test module shares: invoke the CLI in-process and check a clean refusal."""
from __future__ import annotations

from click.testing import CliRunner, Result

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
