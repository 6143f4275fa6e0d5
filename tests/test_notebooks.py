"""CI executes both analysis notebooks on the embedded testbed with small settings; a failing cell fails the test."""
import subprocess
import sys
from pathlib import Path

import pytest

from memprune.models import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "notebooks").glob("[0-9]*.py"))


@pytest.mark.slow
@pytest.mark.skipif(not (Path(DEFAULT_MODEL) / "model_index.json").is_file(), reason="data/testbed not built yet")
@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
def test_notebook_executes(source, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "run_notebooks.py"), "--quick", "--out", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / f"{source.stem}.ipynb").stat().st_size > 10_000  # executed, with outputs (figures)



@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
def test_committed_notebook_is_the_executed_source(source):
    """The .ipynb beside each source was executed from that exact source, shows figures and no progress bars."""
    import jupytext
    import nbformat

    executed = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    code = lambda nb: [cell.source.strip() for cell in nb.cells if cell.cell_type == "code"]  # noqa: E731
    assert code(executed) == code(jupytext.read(source)), (
        f"{source.name} changed since it was executed: run `make notebooks`"
    )
    outputs = [out for cell in executed.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    assert all(out.get("output_type") != "error" for out in outputs)
    figures = [out["data"]["image/png"] for out in outputs if "image/png" in out.get("data", {})]
    assert len(figures) >= 2 and len(set(figures)) == len(figures), "missing or duplicated figures"
    stderr = "".join(out.get("text", "") for out in outputs if out.get("name") == "stderr")
    assert "it/s]" not in stderr and "IProgress" not in stderr, stderr[:300]
