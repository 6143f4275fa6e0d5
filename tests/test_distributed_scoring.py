"""evaluate and attack over processes: the round-robin split, 2 gloo processes write what 1 writes, refusals, and
benchmark's --processes passed through to them."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers import assert_refused, run
from memprune.distributed import FAULT_ENV, Processes
from memprune.work_split import share
from test_attack import attack_inputs  # noqa: F401 (the module fixture: tiny model, edited copies, images)
from test_evaluate import write_edited

EVALUATE = ("--steps", 2, "--seeds", 2, "--batch-size", 2, "--device", "cpu")
ATTACK = ("--steps", 2, "--seeds", 2, "--attack-steps", 2, "--noise-samples", 1, "--budget-step", 1,
          "--device", "cpu")


def test_round_robin_shares_cover_every_item_once():
    shares = [share(7, Processes(rank, 3)) for rank in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(i for s in shares for i in s) == list(range(7))
    assert share(3, Processes()) == [0, 1, 2]


@pytest.fixture(scope="module")
def evaluate_inputs(saved_pipelines, tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate_processes")
    model = saved_pipelines["sd1"]
    (folder / "memorized.txt").write_text("a red circle\nthe cat\na blue square\n")
    (folder / "reference.txt").write_text("the green dog\na photo of the dog\n")
    edited = write_edited(model, folder / "edited", model)
    # Wen's mitigation runs whole on the main process: its per-image records must come out in order too
    args = ("evaluate", "--model", model, "--edited", edited, "--memorized", folder / "memorized.txt",
            "--reference", folder / "reference.txt", "--mitigation", "wen", "--wen-iterations", 2, *EVALUATE)
    return {"folder": folder, "args": args}


def test_evaluate_more_processes_than_pipeline_calls_is_refused(evaluate_inputs):
    # 3 + 2 prompts in batches of 2 (2 + 1 calls per file) x 2 seeds: 6 pipeline calls
    out = evaluate_inputs["folder"] / "too_many"
    result = run(*evaluate_inputs["args"], "--processes", 7, "--out", out)
    assert_refused(result, "--processes 7 is more than the work: 5 prompts in 2 files x 2 seeds in batches of 2 "
                           "make 6 pipeline calls; use at most 6 processes.")
    assert not out.exists()


def test_attack_more_processes_than_jobs_is_refused(attack_inputs):  # noqa: F811
    folder, model = attack_inputs["folder"], attack_inputs["model"]
    out = folder / "too_many"
    # 2 prompts with a training image (the third has none) and, by default, as many same-style controls: 1 in the file
    result = run("attack", "--model", model, "--prompts", folder / "memorized.csv", "--control",
                 folder / "control.csv", *ATTACK, "--processes", 4, "--out", out)
    assert_refused(result, "--processes 4 is more than the work: 2 prompts to attack and 1 control captions make 3 "
                           "attacks per model; use at most 3 processes.")
    assert not out.exists()


def same_tables(one: Path, two: Path, name: str, timing: tuple[str, ...] = ()) -> pd.DataFrame:
    """Two runs' tables equal exactly, but for timing columns or rows."""
    a, b = pd.read_csv(one / name), pd.read_csv(two / name)
    if "metric" in a:
        a, b = (frame[~frame.metric.isin(timing)].reset_index(drop=True) for frame in (a, b))
    a, b = (frame.drop(columns=[c for c in timing if c in frame]) for frame in (a, b))
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    return a


@pytest.mark.slow
def test_two_processes_evaluate_equals_one_and_a_failing_rank_stops_all(evaluate_inputs, monkeypatch):
    folder, args = evaluate_inputs["folder"], evaluate_inputs["args"]
    one = run(*args, "--out", folder / "one")
    assert one.exit_code == 0, one.output
    two = run(*args, "--processes", 2, "--out", folder / "two")
    assert two.exit_code == 0, two.output
    metrics = same_tables(folder / "one", folder / "two", "metrics.csv",
                          ("seconds_per_image", "seconds_per_image_ratio"))
    assert len(metrics) > 20 and np.isfinite(metrics.value).sum() > 20
    assert {"unedited", "edited", "random_control", "wen"} <= set(metrics.model)
    same_tables(folder / "one", folder / "two", "generations.csv")
    grids = sorted(path.name for path in (folder / "one" / "grids").iterdir())
    assert grids == ["memorized.png", "non_memorized.png"]
    for name in grids:  # the generations themselves, pixel for pixel
        with Image.open(folder / "one" / "grids" / name) as a, Image.open(folder / "two" / "grids" / name) as b:
            assert np.array_equal(np.asarray(a), np.asarray(b)), name
    # Process 1 raises at its second pipeline call: the other is stopped, the message names process 1, no folder.
    monkeypatch.setenv(FAULT_ENV, "1:1")
    failed = run(*args, "--processes", 2, "--out", folder / "failed")
    assert_refused(failed, "Process 1 of 2 failed (RuntimeError: injected fault in process 1 after 1 pipeline calls)")
    assert not (folder / "failed").exists()


@pytest.mark.slow
def test_two_processes_attack_equals_one_and_a_failing_rank_stops_all(attack_inputs, monkeypatch):  # noqa: F811
    folder, model, edited = attack_inputs["folder"], attack_inputs["model"], attack_inputs["edited"]
    args = ("attack", "--model", model, "--edited", edited["wanda"], "--prompts", folder / "memorized.csv",
            "--control", folder / "control.csv", *ATTACK)
    one = run(*args, "--out", folder / "attack_one")
    assert one.exit_code == 0, one.output
    two = run(*args, "--processes", 2, "--out", folder / "attack_two")
    assert two.exit_code == 0, two.output
    metrics = same_tables(folder / "attack_one", folder / "attack_two", "metrics.csv", ("attack_seconds_per_prompt",))
    assert set(metrics.model) == {"unedited", "edited"}
    same_tables(folder / "attack_one", folder / "attack_two", "per_prompt.csv", ("attack_seconds",))
    same_tables(folder / "attack_one", folder / "attack_two", "generations.csv")
    same_tables(folder / "attack_one", folder / "attack_two", "budget.csv")
    monkeypatch.setenv(FAULT_ENV, "0:1")  # the main process fails at its second attack
    failed = run(*args, "--processes", 2, "--out", folder / "attack_failed")
    assert_refused(failed, "Process 0 of 2 failed (RuntimeError: injected fault in process 0 after 1 pipeline calls)")
    assert not (folder / "attack_failed").exists()


def test_benchmark_passes_processes_to_evaluate_and_attack(tmp_path):
    from memprune.benchmark.arms import parse_arms
    from memprune.benchmark.run import BenchmarkSettings, scoring_runs
    from memprune.benchmark.state import BenchmarkState
    from memprune.cli import main
    from memprune.commands.benchmark import command_options

    arms = parse_arms('[arms.w]\nmethod = "wanda"\nratio = 0.2\n', command_options(main))
    state = BenchmarkState(tmp_path, {}, {})
    settings = BenchmarkSettings(model="M")
    runs = scoring_runs(arms, ["w"], settings, state, None, "cpu", processes=3)
    assert [r.verb for r in runs] == ["evaluate", "attack"]
    for scoring in runs:
        at = scoring.argv.index("--processes")
        assert scoring.argv[at + 1] == "3"
        assert main.commands[scoring.verb].make_context(scoring.verb, scoring.argv[1:]).params["processes"] == 3
    assert all("--processes" not in r.argv for r in scoring_runs(arms, ["w"], settings, state, None, "cpu"))
    help_text = run("benchmark", "--help").output
    assert "--processes" in help_text
