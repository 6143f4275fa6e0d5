"""Execute the jupytext notebook sources (notebooks/*.py, percent format) and write the executed .ipynb.

    python scripts/run_notebooks.py                 # full settings, writes notebooks/*.ipynb (make notebooks)
    python scripts/run_notebooks.py --quick --out D # small settings (MEMPRUNE_QUICK=1), writes into D (CI)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jupytext
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


def run(source: Path, target: Path, timeout: int) -> float:
    notebook = jupytext.read(source)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    start = time.perf_counter()
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    target.parent.mkdir(parents=True, exist_ok=True)
    jupytext.write(notebook, target)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small settings, for CI")
    parser.add_argument("--out", type=Path, default=ROOT / "notebooks")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per cell")
    parser.add_argument("names", nargs="*", help="notebook sources to run (default: all)")
    args = parser.parse_args()
    # Rendered notebooks should show results, not progress bars and library chatter (the kernel inherits these).
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.quick:
        os.environ["MEMPRUNE_QUICK"] = "1"  # the kernel inherits it; the notebooks' parameter cells read it
    sources = [Path(n) for n in args.names] or sorted((ROOT / "notebooks").glob("[0-9]*.py"))
    for source in sources:
        seconds = run(source, args.out / f"{source.stem}.ipynb", args.timeout)
        print(f"{source.name}: executed in {seconds:.0f} s -> {args.out / (source.stem + '.ipynb')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
