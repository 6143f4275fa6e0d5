"""`locate --resume`: a killed run continues from its partial statistics and equals an uninterrupted one."""
import json

import pytest
import torch

import memprune.models
from helpers import run
from memprune.checkpoint import partial_folder
from memprune.commands.locate import locate_to_folder
from memprune.distributed import FAULT_ENV
from memprune.errors import MemPruneError
from memprune.generate import GenerationSettings
from memprune.locate import LocateSettings
from memprune.masks import Masks
from memprune.stats import FIELDS, NeuronStats

GENERATION = GenerationSettings(steps=3, batch_size=1)  # 4 prompts: 4 memorized + 4 reference calls


def settings_for(model, prompts, **generation):
    return LocateSettings(model=str(model), memorized=str(prompts),
                          generation=GenerationSettings(**{**vars(GENERATION), **generation}))


def count_denoiser_calls(monkeypatch) -> list:
    """Make locate's pipelines count their denoiser calls (one per sampling step)."""
    calls = []
    load = memprune.models.load_pipeline

    def counting_load(*args, **kwargs):
        pipe = load(*args, **kwargs)
        pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
        return pipe

    monkeypatch.setattr(memprune.models, "load_pipeline", counting_load)
    return calls


def test_resume_after_a_kill_equals_an_uninterrupted_run(saved_pipelines, prompt_file, tmp_path, monkeypatch):
    model = saved_pipelines["sd1"]
    settings = settings_for(model, prompt_file)
    locate_to_folder(settings, tmp_path / "whole", device="cpu")

    # Killed before its 6th pipeline call: the memorized set is done, one reference call is saved.
    monkeypatch.setenv(FAULT_ENV, "0:5")
    with pytest.raises(RuntimeError, match="injected fault"):
        locate_to_folder(settings, tmp_path / "run", device="cpu", checkpoint_seconds=0)
    partial = partial_folder(tmp_path / "run")
    assert not (tmp_path / "run").exists() and sorted(p.name for p in partial.iterdir())[-1] == "settings.json"
    assert len(list(partial.glob("*.rank0.safetensors"))) == 2 and not list(partial.glob("*.tmp"))
    monkeypatch.delenv(FAULT_ENV)

    with pytest.raises(MemPruneError, match="pass --resume to continue"):
        locate_to_folder(settings, tmp_path / "run", device="cpu")
    with pytest.raises(MemPruneError, match="made with --steps 3, this run has --steps 4"):
        locate_to_folder(settings_for(model, prompt_file, steps=4), tmp_path / "run", device="cpu", resume=True)
    other_prompts = tmp_path / "other.csv"
    other_prompts.write_text(prompt_file.read_text().replace("red", "blue"))
    with pytest.raises(MemPruneError, match="made with --memorized"):
        locate_to_folder(settings_for(model, other_prompts), tmp_path / "run", device="cpu", resume=True)
    original = prompt_file.read_bytes()
    prompt_file.write_bytes(original.replace(b"red", b"blue"))
    with pytest.raises(MemPruneError, match="the contents of --memorized changed"):
        locate_to_folder(settings, tmp_path / "run", device="cpu", resume=True)
    prompt_file.write_bytes(original)
    with pytest.raises(MemPruneError, match="--processes 1, this run has --processes 2"):
        from memprune.checkpoint import open_partial
        from memprune.commands.locate import resume_fingerprint
        from memprune.distributed import Processes

        open_partial(tmp_path / "run", resume_fingerprint(settings, None, 2), True, False, Processes())

    calls = count_denoiser_calls(monkeypatch)
    summary = locate_to_folder(settings, tmp_path / "run", device="cpu", resume=True)
    assert "resumed" in summary and len(calls) == 3 * GENERATION.steps  # only the 3 reference calls left
    assert not partial.exists()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["resumed"] is True

    whole, resumed = Masks.load(tmp_path / "whole"), Masks.load(tmp_path / "run")
    assert whole.indices.keys() == resumed.indices.keys()
    assert all(torch.equal(whole.indices[k], resumed.indices[k]) for k in whole.indices)
    for name in ("memorized", "reference"):
        a = NeuronStats.load(tmp_path / "whole" / "stats" / f"{name}.safetensors")
        b = NeuronStats.load(tmp_path / "run" / "stats" / f"{name}.safetensors")
        for key, acc in a.accumulators.items():
            assert (acc.count, acc.tokens) == (b[key].count, b[key].tokens)
            for field in FIELDS:  # same merges in the same order: bit for bit
                assert torch.equal(getattr(acc, field), getattr(b[key], field)), (name, key, field)


def test_cli_resume_and_a_run_that_fails_before_recording_leaves_nothing_to_resume(
    saved_pipelines, prompt_file, tmp_path, monkeypatch
):
    args = ["locate", "--model", str(saved_pipelines["sd1"]), "--memorized", str(prompt_file), "--steps", "2",
            "--batch-size", "2", "--device", "cpu", "--checkpoint-every", "0", "--out", str(tmp_path / "out")]
    monkeypatch.setenv(FAULT_ENV, "0:1")
    killed = run(*args)
    assert killed.exit_code != 0 and partial_folder(tmp_path / "out").is_dir()
    monkeypatch.delenv(FAULT_ENV)
    resumed = run(*args, "--resume", "--ratio", "0.05")  # selection may change on resume
    assert resumed.exit_code == 0, resumed.output
    assert "resumed" in resumed.output and not partial_folder(tmp_path / "out").exists()
    # Nothing recorded yet (here: a half the pipeline cannot give) -> no partial folder to trip the next run.
    refused = run(*args[:-1], tmp_path / "out2", "--guidance-scale", "1", "--half", "uncond")
    assert refused.exit_code == 1 and "classifier-free guidance" in refused.output
    assert not partial_folder(tmp_path / "out2").exists()
