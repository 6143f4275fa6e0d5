"""memprune benchmark: arms built from other arms (masks_from: robust-wanda grown from a Wanda arm's located masks;
from: a fine-tune of another arm's edited model). Their command lines, file order, refusals with the line, a resume
that refuses a changed source and rebuilds what was built from a rebuilt one, and a tiny end-to-end run."""
import json
import re
from pathlib import Path

import pandas as pd
import pytest

import memprune.benchmark.run as benchmark_run
from helpers import assert_refused, run, write_benchmark_inputs
from memprune.benchmark.arms import parse_arms
from memprune.benchmark.run import BenchmarkSettings, build_arm, run_benchmark
from memprune.benchmark.state import BenchmarkState
from memprune.cli import main
from memprune.commands.benchmark import command_options
from memprune.errors import MemPruneError

COMMANDS = command_options(main)
SOURCES = """
[arms.w]
method = "wanda"
ratio = 0.3
steps = 2
num_prompts = 2
timesteps = 2

[arms.robust]
method = "robust-wanda"
masks_from = "w"
rounds = 1
attack_steps = 1
timesteps = 2

[arms.hardened]
method = "adversarial"
from = "w"
rounds = 1
attack_steps = 1
steps = 2
"""


def test_sources_become_the_masks_and_from_of_the_command_lines(tmp_path):
    """robust-wanda's --masks is its source arm's masks folder, the fine-tune's --from its source arm's model; the
    robust arm's random control is its own (drawn from its built model), the fine-tune has none."""
    arms = parse_arms(SOURCES + '[arms.u]\nmethod = "uniforget"\nmasks_from = "w"\ncontrol = false\n', COMMANDS)
    state = BenchmarkState(tmp_path, {}, {})
    argvs: list[list[str]] = []
    for arm in arms:
        build_arm(arm, BenchmarkSettings(model="M", memorized="mem.csv"), state, argvs.append, COMMANDS, "cpu")
    masks, models = tmp_path / "masks", tmp_path / "models"
    assert [argv[0] for argv in argvs] == ["locate", "prune", "prune", "finetune", "prune"]
    assert argvs[2] == ["prune", "--method", "robust-wanda", "--model", "M", "--device", "cpu", "--memorized",
                        "mem.csv", "--rounds", "1", "--attack-steps", "1", "--timesteps", "2", "--masks",
                        str(masks / "w"), "--masks-out", str(masks / "robust"), "--out", str(models / "robust"),
                        "--overwrite"]
    assert argvs[3] == ["finetune", "--method", "adversarial", "--model", "M", "--device", "cpu", "--memorized",
                        "mem.csv", "--rounds", "1", "--attack-steps", "1", "--steps", "2", "--from", str(models / "w"),
                        "--out", str(models / "hardened"), "--overwrite"]
    assert argvs[4][:4] == ["prune", "--method", "uniforget", "--model"] and argvs[4][-7:-5] == ["--masks",
                                                                                                  str(masks / "w")]
    named = {arm.name: arm for arm in arms}
    assert named["robust"].control == "robust_random_control" and named["hardened"].control is None
    assert named["robust"].source == "w" and named["hardened"].source == "w" and named["w"].source is None


@pytest.mark.parametrize("text, message", [
    ('[arms.a]\nmethod = "wanda"\n[arms.r]\nmethod = "robust-wanda"\nmasks_from = "b"\n',
     "line 5: arm 'r', masks_from = 'b' names no arm of the file: arms are a, r."),
    ('[arms.r]\nmethod = "robust-wanda"\nmasks_from = "a"\n[arms.a]\nmethod = "wanda"\n',
     "line 3: arm 'r', masks_from = 'a' is defined after it: arms are built in file order"),
    ('[arms.f]\nmethod = "adversarial"\nsteps = 2\nfrom = "f"\n', "line 4: arm 'f', from = 'f' is the arm itself"),
    ('[arms.a]\nmethod = "wanda"\n[arms.r]\nmethod = "robust-wanda"\nmasks_from = "a_random_control"\n',
     "line 5: arm 'r', masks_from = 'a_random_control' is the random control of arm 'a', not an arm"),
    ('[arms.u]\nmethod = "uniforget"\ncontrol = false\n[arms.r]\nmethod = "robust-wanda"\nmasks_from = "u"\n',
     "line 6: arm 'r', masks_from = 'u' is not a located arm"),
    ('[arms.n]\nmethod = "nemo"\n[arms.r]\nmethod = "robust-wanda"\nmasks_from = "n"\n',
     "line 5: arm 'r', masks_from = 'n' is a nemo arm: robust-wanda starts from wanda masks."),
    ('[arms.r]\nmethod = "robust-wanda"\nrounds = 2\n', "line 1: arm 'r' (robust-wanda) starts from located wanda "
     "masks: set masks_from"),
    ('[arms.a]\nmethod = "wanda"\n[arms.b]\nmethod = "wanda"\nmasks_from = "a"\n',
     "line 5: arm 'b' (wanda) takes no masks (its masks come from its own locate)"),
    ('[arms.a]\nmethod = "wanda"\n[arms.d]\nmethod = "doco"\nmasks_from = "a"\n',
     "line 5: arm 'd' (doco) takes no masks (it is a finetune)"),
    ('[arms.a]\nmethod = "wanda"\n[arms.r]\nmethod = "robust-wanda"\nmasks_from = "a"\nfrom = "a"\n',
     "line 6: arm 'r' (robust-wanda) is a weight edit; from is for fine-tunes"),
    ('[arms.m]\nmethod = "wen"\n[arms.f]\nmethod = "adversarial"\nfrom = "m"\n',
     "line 5: arm 'f', from = 'm' is a mitigation and builds no model"),
    ('[arms.a]\nmethod = "wanda"\n[arms.r]\nmethod = "robust-wanda"\nmasks_from = 1\n',
     "line 5: arm 'r', masks_from: give the name of another arm as a string"),
])
def test_bad_sources_are_refused_naming_the_line(text, message):
    with pytest.raises(MemPruneError, match=re.escape(message)):
        parse_arms(text, COMMANDS, "arms.toml")


def test_a_changed_source_is_a_change_of_every_arm_built_from_it(tmp_path):
    arms = {arm.name: arm.fingerprint() for arm in parse_arms(SOURCES, COMMANDS)}
    changed = {arm.name: arm.fingerprint() for arm in parse_arms(SOURCES.replace("ratio = 0.3", "ratio = 0.2"),
                                                                  COMMANDS)}
    assert all(arms[name] != changed[name] for name in arms)  # the source and both arms built from it
    # An arm without a source keeps the fingerprint it had before sources existed (older states resume).
    assert json.loads(arms["w"]).keys() == {"method", "options", "control"}
    out = tmp_path / "bench"
    out.mkdir()
    BenchmarkState(out, changed, {}).save()
    (tmp_path / "arms.toml").write_text(SOURCES)
    result = run("benchmark", "--model", tmp_path / "M", "--arms", tmp_path / "arms.toml", "--out", out, "--resume")
    assert_refused(result, "Cannot resume: arm 'w' has changed settings")


def test_resume_rebuilds_what_was_built_from_a_rebuilt_arm(tmp_path, monkeypatch):
    """Arms are built in file order; a model kept by a resume is rebuilt when its source (or, for a control, its
    arm) had to be rebuilt: its folder was lost."""
    def runner(argv):
        if "--out" in argv and argv[0] in ("prune", "finetune"):
            folder = Path(argv[argv.index("--out") + 1])
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "model_index.json").write_text("{}")

    def control(arm, settings, state, device):
        runner(["prune", "--out", str(state.model_folder(arm.control))])

    monkeypatch.setattr(benchmark_run, "build_control", control)
    monkeypatch.setattr(benchmark_run, "write_comparison", lambda *args: None)
    arms = parse_arms(SOURCES, COMMANDS)
    settings = BenchmarkSettings(model="M", attack=False)
    state = BenchmarkState(tmp_path, {arm.name: arm.fingerprint() for arm in arms}, settings.record())
    log: list[str] = []
    build = lambda: run_benchmark(arms, settings, state, runner, COMMANDS, "cpu", log.append).built  # noqa: E731
    everything = ["w", "w_random_control", "robust", "robust_random_control", "hardened"]
    assert build() == everything and state.stages == ["evaluate"]
    (state.model_folder("robust") / "model_index.json").unlink()
    assert build() == ["robust", "robust_random_control"]
    assert "[2/3] building robust_random_control (built from robust, which was rebuilt) ..." in log
    (state.model_folder("w") / "model_index.json").unlink()
    assert build() == everything
    assert build() == [] and log[-1] == "evaluate: done before, kept."


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = write_benchmark_inputs(tmp_path_factory.mktemp("sources"))
    (folder / "retain.txt").write_text("a green tree\na small house\n")
    return folder


@pytest.mark.slow
def test_robust_wanda_and_a_hardened_wanda_edit_end_to_end(saved_pipelines, inputs, tmp_path):
    arms = tmp_path / "arms.toml"
    arms.write_text(SOURCES + f'batch_size = 2\nsampling_steps = 2\nretain = "{inputs / "retain.txt"}"\n')
    out = tmp_path / "bench"
    model = saved_pipelines["sd1"]
    result = run("benchmark", "--model", model, "--arms", arms, "--memorized", inputs / "memorized.csv",
                 "--reference", inputs / "reference.txt", "--steps", 2, "--seeds", 1, "--no-attack",
                 "--evaluate-option", "--grid-prompts 0", "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    metrics = pd.read_csv(out / "comparison.csv")
    assert list(dict.fromkeys(metrics.model)) == ["unedited", "w", "w_random_control", "robust",
                                                  "robust_random_control", "hardened"]
    zeroed = {name: sum(json.loads((out / "models" / name / "memprune.json").read_text())["zeroed_weights"].values())
              for name in ("w", "robust", "robust_random_control")}
    # robust-wanda grew w's located mask (its masks folder names w's as round 0); its control matches its size.
    grown = json.loads((out / "masks" / "robust" / "run.json").read_text())
    assert str(out / "masks" / "w") in json.dumps(grown["inputs"])
    assert zeroed["robust"] > zeroed["w"] > 0 and zeroed["robust_random_control"] == zeroed["robust"]
    hardened = json.loads((out / "models" / "hardened" / "memprune.json").read_text())
    assert hardened["started_from"]["path"] == str((out / "models" / "w").resolve())
    assert hardened["method_info"]["surrogate"] == "prompt"  # DoRI's target for a hardened edit
