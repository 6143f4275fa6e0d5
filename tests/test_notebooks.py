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
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_notebooks.py"), "--quick", "--out", str(tmp_path),
                             str(source)], capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / f"{source.stem}.ipynb").stat().st_size > 10_000  # executed, with outputs (figures)

