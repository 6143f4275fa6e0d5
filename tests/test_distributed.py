"""Locate across processes: shards, rank-order merge, 2 gloo processes equal 1, a failing rank stops all."""
import json

import pytest
import torch

from memprune.commands.locate import locate_to_folder
from memprune.distributed import FAULT_ENV, Processes, _failure_message
from memprune.errors import MemPruneError
from memprune.generate import GenerationSettings, call_plan
from memprune.locate import LocateSettings
from memprune.masks import Masks
from memprune.stats import FIELDS, NeuronStats

GENERATION = GenerationSettings(steps=3, batch_size=1)


def test_shards_are_contiguous_balanced_and_cover_every_call_once():
    calls = call_plan(["a", "b", "c", "d", "e"], GenerationSettings(seeds=2, batch_size=2))
    # seed-major, then prompt batches: (0: ab, cd, e), (1: ab, cd, e)
    assert [(c.seed, c.start, c.prompts) for c in calls[:3]] == [(0, 0, ("a", "b")), (0, 2, ("c", "d")), (0, 4, ("e",))]
    shards = [Processes(rank, 4).shard(calls) for rank in range(4)]
    assert [len(s) for s in shards] == [2, 2, 1, 1]
    assert [c for s in shards for c in s] == calls


def test_more_processes_than_pipeline_calls_is_refused(saved_pipelines, prompt_file, tmp_path):
    settings = LocateSettings(model=str(saved_pipelines["sd1"]), memorized=str(prompt_file),
                              generation=GenerationSettings(steps=2, batch_size=2))  # 4 prompts -> 2 calls
    with pytest.raises(MemPruneError, match="--processes 3 is more than the work.*2 pipeline calls"):
        locate_to_folder(settings, tmp_path / "out", device="cpu", processes=3)
    assert not (tmp_path / "out").exists()


def test_failure_report_names_the_rank_that_failed_first_not_the_ones_that_lost_it(tmp_path):
    def report(rank, when, message, communication=False):
        (tmp_path / f"error-{rank}.json").write_text(json.dumps(
            {"rank": rank, "time": when, "message": message, "type": "RuntimeError", "memprune": False,
             "communication": communication}))

    report(0, 1.0, "Connection closed by peer", communication=True)
    report(2, 3.0, "later failure")
    report(1, 2.0, "out of memory")
    message = _failure_message(tmp_path, 3, 0, 1)
    assert (
        message.startswith("Process 1 of 3 failed (RuntimeError: out of memory)") and "nothing was written" in message
    )
    for path in tmp_path.iterdir():
        path.unlink()
    assert _failure_message(tmp_path, 2, 1, -9).startswith("Process 1 of 2 was killed by signal 9")


def assert_same_statistics(a: NeuronStats, b: NeuronStats, rtol: float) -> None:
    assert a.accumulators.keys() == b.accumulators.keys() and a.timesteps == b.timesteps
    for key, acc in a.accumulators.items():
        assert (acc.count, acc.tokens) == (b[key].count, b[key].tokens)
        for name in FIELDS:
            x, y = getattr(acc, name), getattr(b[key], name)
            assert x.dtype == y.dtype == torch.float64
            scale = x.abs().max().clamp_min(1e-300)
            assert ((x - y).abs().max() / scale).item() <= rtol, (key, name)


@pytest.mark.slow
def test_two_gloo_processes_equal_one_and_a_failing_rank_stops_all(saved_pipelines, prompt_file, tmp_path, monkeypatch):
    settings = LocateSettings(model=str(saved_pipelines["sd1"]), memorized=str(prompt_file), generation=GENERATION)
    locate_to_folder(settings, tmp_path / "one", device="cpu")
    summary = locate_to_folder(settings, tmp_path / "two", device="cpu", processes=2)
    assert "in 2 processes" in summary
    one, two = Masks.load(tmp_path / "one"), Masks.load(tmp_path / "two")
    assert one.indices.keys() == two.indices.keys()
    assert all(torch.equal(one.indices[key], two.indices[key]) for key in one.indices)
    assert sum(one.count().values()) > 0
    for name in ("memorized", "reference"):
        a = NeuronStats.load(tmp_path / "one" / "stats" / f"{name}.safetensors")
        b = NeuronStats.load(tmp_path / "two" / "stats" / f"{name}.safetensors")
        assert_same_statistics(a, b, rtol=1e-12)
        assert a[("down_blocks.0.attentions.0.transformer_blocks.0.ff", 0)].count == 2 * 4  # CFG x 4 prompts
    assert json.loads((tmp_path / "two" / "run.json").read_text())["processes"] == 2

    # Rank 1 raises at its second pipeline call: the other stops, the message names rank 1, nothing is written.
    monkeypatch.setenv(FAULT_ENV, "1:1")
    with pytest.raises(
        MemPruneError, match=r"Process 1 of 2 failed \(RuntimeError: injected fault.*nothing was written"
    ):
        locate_to_folder(settings, tmp_path / "failed", device="cpu", processes=2)
    assert not (tmp_path / "failed").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".failed.tmp")]
    # (A rank that dies without a word, FAULT_ENV "1:0:exit", ends the same way, named from its exit code; the
    # message is tested above without paying for another pair of processes.)
