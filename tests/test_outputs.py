"""What every command shares when it writes or reads its folders: output permissions under the user's umask,
temporary folders of killed runs removed by the next run, `--resume` with nothing to resume, a masks path that
is a file, and float options that refuse NaN and infinity."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import click
import pytest
from click.testing import CliRunner

from memprune.checkpoint import open_partial, partial_folder
from memprune.cli_types import FINITE_FLOAT, FiniteFloatRange, require_finite
from memprune.errors import MemPruneError
from memprune.masks import Masks
from memprune.model_card import write_card
from memprune.runinfo import (
    apply_default_permissions,
    atomic_output_dir,
    check_output_dir,
    current_umask,
    stale_staging,
)

ONE_PROCESS = SimpleNamespace(barrier=lambda: None, is_main=True, rank=0)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


# --------------------------------------------------------------------------------------------- permissions
def test_output_gets_the_modes_of_an_ordinary_save(tmp_path, umask_022):
    out = tmp_path / "out"
    with atomic_output_dir(out) as staging:
        (staging / "unet").mkdir()
        (staging / "unet" / "weights.safetensors").write_bytes(b"x")
        (staging / "unet" / "weights.safetensors").chmod(0o600)  # as a temporary file would leave it
        (staging / "README.md").write_text("card")
    assert mode(out) == 0o755 and mode(out / "unet") == 0o755
    assert mode(out / "unet" / "weights.safetensors") == 0o644 and mode(out / "README.md") == 0o644


def test_permissions_follow_the_umask(tmp_path):
    (tmp_path / "folder").mkdir(mode=0o700)
    (tmp_path / "folder" / "file").write_text("x")
    apply_default_permissions(tmp_path / "folder", umask=0o077)
    assert mode(tmp_path / "folder") == 0o700 and mode(tmp_path / "folder" / "file") == 0o600
    apply_default_permissions(tmp_path / "folder", umask=0o002)
    assert mode(tmp_path / "folder") == 0o775 and mode(tmp_path / "folder" / "file") == 0o664
    assert current_umask() == current_umask()  # reading it leaves it as it was


def test_model_card_is_readable_and_leaves_no_temporary_file(tmp_path, umask_022):
    write_card(tmp_path, {"method": "wanda", "source": "model"})
    assert mode(tmp_path / "README.md") == 0o644
    with pytest.raises(AttributeError):  # `info` must be a dict: the card fails before any file is made
        write_card(tmp_path, ["not", "a", "dict"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


# --------------------------------------------------------------------------------------------- killed runs
def killed_run_leftovers(parent: Path, name: str) -> list[Path]:
    """What kills at different moments leave: staging of this and of an older naming, a half-replaced output,
    detect's and the testbed's staging."""
    dead_pid = 2**22 + 1  # larger than any PID: no process runs under it
    names = [f"tmp-{dead_pid}-abcd1234", "tmp-k3j2_x9q", f"old-{dead_pid}-zz", "run-a1b2", f"tmp-{dead_pid}",
             f"tmp-{dead_pid}.old"]
    leftovers = [parent / f".{name}.{suffix}" for suffix in names]
    for folder in leftovers:
        (folder / "unet").mkdir(parents=True)
        (folder / "unet" / "weights.safetensors").write_bytes(b"x" * 10)
    return leftovers


def test_the_next_run_with_the_same_out_removes_what_killed_runs_left(tmp_path):
    leftovers = killed_run_leftovers(tmp_path, "out")
    live = tmp_path / f".out.tmp-{os.getpid()}-live"  # a run in progress (this process): left alone
    live.mkdir()
    (tmp_path / f".out.tmp-{os.getpid()}.old").mkdir()  # the testbed swapping in its output right now
    others = [tmp_path / ".other.tmp-1-x", tmp_path / "out.partial", tmp_path / ".outer.tmp-1-x"]
    for folder in others:
        folder.mkdir()
    assert sorted(stale_staging(tmp_path / "out")) == sorted(leftovers)
    notices = []
    with atomic_output_dir(tmp_path / "out", log=notices.append) as staging:
        (staging / "masks.json").write_text("{}")
    assert not any(folder.exists() for folder in leftovers)
    assert live.is_dir() and (tmp_path / f".out.tmp-{os.getpid()}.old").is_dir()
    assert all(folder.is_dir() for folder in others)
    assert len(notices) == 1 and "\n" not in notices[0]
    assert notices[0].startswith("Removed 6 temporary folders that an interrupted run with --out")
    assert (tmp_path / "out" / "masks.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, f".out.tmp-{os.getpid()}.old",
                                                          *(f.name for f in others)])


def test_cleanup_is_said_once_by_check_output_dir_and_silent_when_nothing_is_left(tmp_path, capsys):
    killed_run_leftovers(tmp_path, "out")
    check_output_dir(tmp_path / "out", overwrite=False)
    assert capsys.readouterr().err.count("Removed 6 temporary folders") == 1
    check_output_dir(tmp_path / "out", overwrite=False)
    assert capsys.readouterr().err == ""


def test_a_refused_output_removes_nothing(tmp_path):
    leftovers = killed_run_leftovers(tmp_path, "out")
    (tmp_path / "out").mkdir()
    with pytest.raises(MemPruneError, match="already exists"):
        check_output_dir(tmp_path / "out", overwrite=False)
    assert all(folder.exists() for folder in leftovers)


def test_a_failed_run_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError), atomic_output_dir(tmp_path / "out", log=None):
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------- --resume
def test_resume_without_a_partial_run_says_so_and_starts_over(tmp_path):
    notices = []
    partial, resumed = open_partial(tmp_path / "out", {"steps": 2}, resume=True, overwrite=False,
                                    processes=ONE_PROCESS, log=notices.append)
    assert not resumed and partial.folder == partial_folder(tmp_path / "out")
    assert notices == [f"--resume: no interrupted run to continue in '{partial_folder(tmp_path / 'out')}'; "
                       "starting from the beginning."]
    # The next --resume finds the folder this run made: nothing more is said.
    notices.clear()
    _, resumed = open_partial(tmp_path / "out", {"steps": 2}, resume=True, overwrite=False, processes=ONE_PROCESS,
                              log=notices.append)
    assert resumed and notices == []


def test_without_resume_nothing_is_said(tmp_path):
    notices = []
    open_partial(tmp_path / "out", {"steps": 2}, resume=False, overwrite=False, processes=ONE_PROCESS,
                 log=notices.append)
    assert notices == []


# --------------------------------------------------------------------------------------------- masks path
def test_masks_path_that_is_a_file_is_named(tmp_path):
    given = tmp_path / "notes.txt"
    given.write_text("not masks")
    with pytest.raises(MemPruneError) as error:
        Masks.load(given)
    message = str(error.value)
    assert f"'{given}' is a file, not a folder of masks" in message and "holds no masks.safetensors" in message
    assert message.count(". ") == 0 and message.endswith(".")
    with pytest.raises(MemPruneError, match=f"'{tmp_path / 'missing'}' holds no masks.safetensors"):
        Masks.load(tmp_path / "missing")


# --------------------------------------------------------------------------------------------- finite floats
@click.command()
@click.option("--threshold", type=FINITE_FLOAT, default=None)
@click.option("--ratio", type=FiniteFloatRange(0, 1), default=None)
def tiny_command(threshold, ratio):
    click.echo(f"threshold={threshold} ratio={ratio}")


@pytest.mark.parametrize("option", ["--threshold", "--ratio"])
@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity", "1e999"])
def test_float_options_refuse_nan_and_inf(option, value):
    result = CliRunner().invoke(tiny_command, [option, value])
    assert result.exit_code == 2 and "Traceback" not in result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert error == [f"Error: Invalid value for '{option}': '{value}' is not a finite number."]


def test_finite_floats_still_parse_and_ranges_still_hold():
    assert CliRunner().invoke(tiny_command, ["--threshold", "-0.5", "--ratio", "0.25"]).output == \
        "threshold=-0.5 ratio=0.25\n"
    result = CliRunner().invoke(tiny_command, ["--ratio", "1.5"])
    assert result.exit_code == 2 and "1.5 is not in the range 0<=x<=1" in result.output
    result = CliRunner().invoke(tiny_command, ["--threshold", "abc"])
    assert result.exit_code == 2 and "'abc' is not a valid float" in result.output


def test_require_finite_for_values_that_bypass_click():
    assert require_finite(0.5, "--threshold") == 0.5
    with pytest.raises(MemPruneError, match=r"^--threshold must be a finite number, got nan\.$"):
        require_finite(float("nan"), "--threshold")
    json.dumps(require_finite(1, "--x"))  # ints pass through unchanged
