"""memprune benchmark: arms files checked before any model loads, the joined table equal to evaluate's and attack's
own numbers, resume after a kill redoing nothing finished, changed arms refused by name."""
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import memprune.benchmark.run as benchmark_run
from helpers import assert_refused, run, write_benchmark_inputs

COMMON = ("--steps", 2, "--seeds", 2, "--device", "cpu", "--attack-prompts", 1,
          "--attack-option", "--attack-steps 2 --noise-samples 1 --seeds 1", "--evaluate-option", "--grid-prompts 0")
ARMS = """
[arms.light]
method = "wanda"
ratio = 0.25
steps = 2
num_prompts = 2
timesteps = 2

[arms.heavy]
method = "wanda"
label = "Wanda, half the columns"
ratio = 0.5
steps = 2
num_prompts = 2
timesteps = 1
control = "heavy_random"
"""


@pytest.fixture(scope="module")
def inputs(saved_pipelines, tmp_path_factory):
    folder = write_benchmark_inputs(tmp_path_factory.mktemp("benchmark"))
    (folder / "arms.toml").write_text(ARMS)
    return {"folder": folder, "model": saved_pipelines["sd1"]}


def bench(inputs, out, *extra, arms=None):
    folder = inputs["folder"]
    return run("benchmark", "--model", inputs["model"], "--arms", arms or folder / "arms.toml", "--memorized",
               folder / "memorized.csv", "--reference", folder / "reference.txt", *COMMON, "--out", out, *extra)


@pytest.fixture(scope="module")
def finished(inputs):
    out = inputs["folder"] / "run"
    result = bench(inputs, out)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_benchmark_writes_the_joined_table_of_evaluate_and_attack(inputs, finished):
    out, folder = finished, inputs["folder"]
    metrics = pd.read_csv(out / "comparison.csv")
    assert list(dict.fromkeys(metrics.model)) == ["unedited", "light", "light_random_control", "heavy", "heavy_random"]
    # The controls zero exactly as many weights per tensor as their arm.
    for arm, control in (("light", "light_random_control"), ("heavy", "heavy_random")):
        edited = json.loads((out / "models" / arm / "memprune.json").read_text())["zeroed_weights"]
        info = json.loads((out / "models" / control / "memprune.json").read_text())
        assert info["random_control_of"] == arm and sum(info["zeroed_weights"].values()) == sum(edited.values()) > 0
    # The numbers equal those of evaluate and attack run by hand on the built models with the same options.
    models = [x for name in ("light", "light_random_control", "heavy", "heavy_random")
              for x in ("--compare", out / "models" / name)]
    by_hand = folder / "by_hand"
    common = ("--model", inputs["model"], "--steps", 2, "--device", "cpu", "--exclude-prompts",
              out / "masks" / "light" / "prompts_used.csv")
    result = run("evaluate", *common, *models, "--memorized", folder / "memorized.csv", "--reference",
                 folder / "reference.txt", "--seeds", 2, "--no-random-control", "--grid-prompts", 0, "--out", by_hand)
    assert result.exit_code == 0, result.output
    evaluation = pd.read_csv(by_hand / "metrics.csv")
    joined = metrics.merge(evaluation, on=["model", "group", "metric"], suffixes=("", "_by_hand"))
    assert len(joined) == len(evaluation)
    timing = joined.metric.str.startswith("seconds_per_image")  # wall clock: never equal twice
    np.testing.assert_allclose(joined[~timing].value, joined[~timing].value_by_hand, rtol=1e-6)
    attacked = pd.read_csv(out / "attack" / "metrics.csv")
    attacked = attacked[attacked.metric.str.endswith("_attacked")]
    assert set(attacked.model) == {"unedited", "light", "light_random_control", "heavy", "heavy_random"}
    check = metrics.merge(attacked, on=["model", "group", "metric"], suffixes=("", "_attack"))
    assert len(check) == len(attacked) and (check.value == check.value_attack).all()
    seconds = metrics[metrics.metric == "edit_seconds"].set_index("model").value
    state = json.loads((out / "benchmark.json").read_text())
    assert seconds["heavy"] == state["built"]["heavy"] > 0 and seconds["unedited"] == 0
    table = (out / "comparison.md").read_text()
    assert "| Wanda, half the columns |" in table and "| random control of light (same size) |" in table
    assert "memorization under attack" in table
    with Image.open(out / "comparison.png") as plot:
        assert plot.width > 100
    assert (out / "arms.toml").read_text() == ARMS
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["settings"]["steps"] == 2 and run_info["inputs"]["arms"]["sha256"]
    assert run_info["scored"] == ["evaluate", "attack"] and set(run_info["built_now"]) == set(state["built"])


@pytest.mark.slow
def test_resume_after_a_kill_redoes_nothing_finished(inputs, finished, monkeypatch):
    out = inputs["folder"] / "killed"
    built = []
    real_build = benchmark_run.build_arm

    def build_then_die(arm, *args, **kwargs):
        if built:  # the second arm: killed
            raise KeyboardInterrupt
        built.append(arm.name)
        real_build(arm, *args, **kwargs)

    monkeypatch.setattr(benchmark_run, "build_arm", build_then_die)
    killed = bench(inputs, out)
    assert killed.exit_code != 0 and built == ["light"]
    assert json.loads((out / "benchmark.json").read_text())["built"].keys() == {"light", "light_random_control"}

    calls = []
    stages = []
    monkeypatch.setattr(benchmark_run, "build_arm",
                        lambda arm, *a, **k: (calls.append(arm.name), real_build(arm, *a, **k)))
    real_command = benchmark_run.run_command
    monkeypatch.setattr(benchmark_run, "run_command",
                        lambda runner, argv, what: (stages.append(argv[0]), real_command(runner, argv, what)))
    refused = bench(inputs, out)
    assert_refused(refused, "--resume")
    resumed = bench(inputs, out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert calls == ["heavy"] and "light_random_control: built before, kept." in resumed.output
    assert stages == ["locate", "prune", "evaluate", "attack"]  # heavy's two commands, then the two stages
    # The resumed benchmark's table is the uninterrupted one's (same seeds, same models).
    first, again = pd.read_csv(finished / "comparison.csv"), pd.read_csv(out / "comparison.csv")
    same = ~first.metric.isin(["seconds_per_image", "seconds_per_image_ratio", "edit_seconds"])
    np.testing.assert_allclose(first[same].value, again[same.values].value, rtol=1e-6)
    # Nothing left to do: a second resume (arms from the folder's own copy) builds and evaluates nothing.
    calls.clear(), stages.clear()
    again = bench(inputs, out, "--resume", arms=out / "arms.toml")
    assert again.exit_code == 0 and calls == [] and stages == [], again.output


@pytest.mark.slow
def test_per_model_scoring_resumes_each_run_and_equals_the_joint_table(inputs, finished, monkeypatch):
    out = inputs["folder"] / "per_model"
    ran = []
    real_command = benchmark_run.run_command

    def die_at_second_evaluate(runner, argv, what):
        if argv[0] == "evaluate" and "evaluate" in ran:
            raise KeyboardInterrupt
        ran.append(argv[0])
        real_command(runner, argv, what)

    monkeypatch.setattr(benchmark_run, "run_command", die_at_second_evaluate)
    assert bench(inputs, out, "--per-model").exit_code != 0
    assert json.loads((out / "benchmark.json").read_text())["stages"] == ["evaluate:light"]
    stages = []
    monkeypatch.setattr(benchmark_run, "run_command",
                        lambda runner, argv, what: (stages.append(argv[0]), real_command(runner, argv, what)))
    resumed = bench(inputs, out, "--per-model", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert stages == ["evaluate"] * 3 + ["attack"] * 4 and "evaluate:light: done before, kept." in resumed.output
    assert (out / "evaluate" / "heavy_random" / "metrics.csv").is_file()
    joint = pd.read_csv(finished / "comparison.csv").set_index(["model", "group", "metric"]).value
    each = pd.read_csv(out / "comparison.csv").set_index(["model", "group", "metric"]).value
    assert sorted(joint.index) == sorted(each.index)
    timing = [key for key in joint.index if key[2] in ("seconds_per_image", "seconds_per_image_ratio", "edit_seconds")]
    np.testing.assert_allclose(each.drop(timing)[joint.drop(timing).index], joint.drop(timing), rtol=1e-6)
    assert_refused(bench(inputs, out, "--resume"), "the benchmark's per_model was True and is now False")


def test_resume_with_a_changed_arm_is_refused_naming_it(inputs, tmp_path):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "arms.toml").write_text(ARMS)
    from memprune.benchmark.arms import parse_arms
    from memprune.benchmark.state import BenchmarkState
    from memprune.cli import main
    from memprune.commands.benchmark import command_options

    arms = parse_arms(ARMS, command_options(main))
    BenchmarkState(out, {arm.name: arm.fingerprint() for arm in arms}, {}).save()
    changed = tmp_path / "changed.toml"
    changed.write_text(ARMS.replace("ratio = 0.5", "ratio = 0.4"))
    result = run("benchmark", "--model", inputs["model"], "--arms", changed, "--out", out, "--resume")
    assert_refused(result, "arm 'heavy' has changed settings")
    dropped = tmp_path / "dropped.toml"
    dropped.write_text(ARMS.split("[arms.heavy]")[0])
    assert_refused(run("benchmark", "--model", inputs["model"], "--arms", dropped, "--out", out, "--resume"),
                   "arm 'heavy' is gone")
    assert_refused(run("benchmark", "--model", inputs["model"], "--arms", inputs["folder"] / "arms.toml", "--out",
                       tmp_path / "none", "--resume"), "Nothing to resume")


@pytest.mark.parametrize("text, message", [
    ('[arms.a]\nmethod = "wanda"\n\n[arms.b]\nmethod = "pruneall"\n',
     "line 5: arm 'b' names unknown method 'pruneall': use one of adversarial, doco, gradproj, nemo, "
     "nemo_prompt, plain, robust-wanda, uniforget, wanda, wen."),
    ('[arms.a]\nmethod = "wanda"\nratio = 0.1\nrate = 0.2\n', "line 4: arm 'a' sets unknown option 'rate' for method "
     "wanda: valid options are"),
    ('[arms.a]\nmethod = "wanda"\ntheta = 3.0\n', "line 3: arm 'a' sets unknown option 'theta'"),  # nemo's
    ('[arms.a]\nmethod = "wanda"\nratio = "lots"\n', "line 3: arm 'a', ratio: 'lots' is not a valid float"),
    ('[arms.a]\nmethod = "wanda"\nratio = 2.0\n', "line 3: arm 'a', ratio: 2.0 is not in the range"),
    ('[arms.a]\nmethod = "gradproj"\ncontrol = true\n', "line 3: arm 'a' is a finetune; random controls are for"),
    ('[arms.a]\nmethod = "wen"\n[arms.b]\nmethod = "wen"\n', "arm 'b' is a second mitigation"),
    ('[arms.a]\nmethod = "wanda"\n[arms.a_random_control]\nmethod = "wanda"\n', "the name 'a_random_control'"),
    ("[arms.a\n", "is not valid TOML"),
    ("title = 'x'\n", "unknown top-level key 'title'"),
])
def test_bad_arms_files_are_refused_before_any_model_loads(inputs, tmp_path, monkeypatch, text, message):
    import memprune.models

    monkeypatch.setattr(memprune.models, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    arms = tmp_path / "arms.toml"
    arms.write_text(text)
    assert_refused(bench(inputs, tmp_path / "out", arms=arms), message)
    assert not (tmp_path / "out").exists()


def test_wanda_options_map_to_the_commands(inputs):
    from memprune.benchmark.arms import parse_arms
    from memprune.cli import main
    from memprune.commands.benchmark import command_options

    (light, heavy) = parse_arms(ARMS, command_options(main))
    assert light.argv("locate") == ["--ratio", "0.25", "--steps", "2", "--num-prompts", "2"]
    assert light.argv("prune") == ["--timesteps", "2"]
    assert light.control == "light_random_control" and heavy.control == "heavy_random"
    (nemo,) = parse_arms('[arms.n]\nmethod = "nemo"\ntheta = 3.0\nnemo_layers = "all"\ncontrol = false\n',
                         command_options(main))
    assert nemo.argv("locate") == ["--theta", "3.0", "--nemo-layers", "all"] and nemo.control is None
    (wen,) = parse_arms('[arms.w]\nmethod = "wen"\nwen_iterations = 3\n', command_options(main))
    assert wen.argv("evaluate") == ["--wen-iterations", "3"]


def test_help_lists_the_registered_methods_and_the_preset_parses():
    result = run("benchmark", "--help")
    assert result.exit_code == 0
    for name in ("wanda", "nemo", "uniforget", "wen", "gradproj", "doco", "plain", "robust-wanda", "adversarial"):
        assert f"  {name} " in result.output
    from memprune.benchmark.arms import columns, parse_arms
    from memprune.cli import main
    from memprune.commands.benchmark import command_options
    from memprune.commands.defaults import benchmark_preset

    arms = parse_arms(*benchmark_preset("testbed")[:1], command_options(main))
    # NeMo (with a random control of its size) and Wen: the shipped testbed predicts ε, as SD 1.x
    assert columns(arms) == ["wanda_0.1", "random_0.1", "robust_wanda", "random_robust_wanda", "wanda_0.01",
                             "nemo", "random_nemo", "uniforget", "gradproj", "doco", "plain_finetune", "adversarial",
                             "wen"]
    assert [arm.name for arm in arms if arm.kind == "mitigation"] == ["wen"]
    named = {arm.name: arm for arm in arms}
    robust, adversarial = named["robust_wanda"], named["adversarial"]
    assert robust.masks_from == "wanda_0.1" and robust.argv("prune") == ["--rounds", "2", "--attack-steps", "50",
                                                                          "--timesteps", "10"]
    assert adversarial.from_arm is None and adversarial.argv("finetune") == ["--steps", "200", "--rounds", "2",
                                                                             "--attack-steps", "10",
                                                                             "--round-attack", "bounded"]


def test_field_preset_parses_with_a_random_control_beside_each_located_edit():
    from memprune.benchmark.arms import columns, parse_arms
    from memprune.cli import main
    from memprune.commands.benchmark import command_options
    from memprune.commands.defaults import benchmark_preset

    arms = {arm.name: arm for arm in parse_arms(*benchmark_preset("field")[:1], command_options(main))}
    assert columns(list(arms.values())) == ["wanda_0.01", "random_0.01", "nemo", "random_nemo", "uniforget", "doco",
                                            "plain_finetune", "adversarial", "wen"]
    assert arms["wanda_0.01"].argv("locate") == ["--ratio", "0.01", "--num-prompts", "10", "--sample-seed", "0"]
    assert arms["doco"].argv("finetune") == ["--steps", "1000", "--lr", "5e-05"]  # CUIG's DoCo schedule
    assert arms["adversarial"].from_arm == "wanda_0.01"  # DoRI hardens a pruned model


def test_preset_testbed_needs_a_testbed(inputs, tmp_path):
    assert_refused(run("benchmark", "--model", inputs["model"], "--preset", "testbed", "--out", tmp_path / "o"),
                   "is not a memprune testbed")


def test_plot_puts_each_model_at_its_utility_and_memorization():
    from memprune.benchmark.plot import comparison_figure

    metrics = pd.DataFrame([
        ("unedited", "memorized_held_out", "memorization_rate", 0.9),
        ("unedited", "memorized_held_out", "memorization_rate_attacked", 1.0),
        ("wanda", "memorized_held_out", "memorization_rate", 0.4),
        ("wanda", "general", "similarity_to_unedited", 0.8),
        ("wanda", "memorized_held_out", "memorization_rate_attacked", 0.7),
        ("wen", "memorized_held_out", "memorization_rate", 0.2),  # no utility row: not plotted
    ], columns=["model", "group", "metric", "value"])
    figure = comparison_figure(metrics, ["unedited", "wanda", "wen"], {"wanda": "Wanda 0.1"})
    evaluated, attacked = figure.axes
    points = lambda axis: [tuple(c.get_offsets()[0]) for c in axis.collections]  # noqa: E731
    assert points(evaluated) == [(1.0, 0.9), (0.8, 0.4)] and points(attacked) == [(1.0, 1.0), (0.8, 0.7)]
    assert [text.get_text() for text in evaluated.texts] == ["unedited", "Wanda 0.1"]


def test_each_kind_is_built_by_its_commands(tmp_path):
    """The exact command lines: locate then prune (Wanda), prune alone (UniForget), finetune; the benchmark's
    --memorized where the command takes it and the arm gives none."""
    from memprune.benchmark.arms import parse_arms
    from memprune.benchmark.run import BenchmarkSettings, build_arm
    from memprune.benchmark.state import BenchmarkState
    from memprune.cli import main
    from memprune.commands.benchmark import command_options

    commands = command_options(main)
    text = ('[arms.w]\nmethod = "wanda"\nratio = 0.2\ntimesteps = 3\ngranularity = "neuron"\n'
            '[arms.u]\nmethod = "uniforget"\nbeta = 5\nneutral = "n.txt"\n'
            '[arms.p]\nmethod = "plain"\nsteps = 7\nmemorized = "own.csv"\nparams = "unet"\n')
    state = BenchmarkState(tmp_path, {}, {})
    settings = BenchmarkSettings(model="M", memorized="mem.csv")
    argvs = []
    for arm in parse_arms(text, commands):
        build_arm(arm, settings, state, argvs.append, commands, "cpu")
    masks, models = tmp_path / "masks", tmp_path / "models"
    assert argvs == [
        ["locate", "--method", "wanda", "--model", "M", "--device", "cpu", "--memorized", "mem.csv", "--ratio", "0.2",
         "--granularity", "neuron", "--out", str(masks / "w"), "--overwrite"],
        ["prune", "--model", "M", "--device", "cpu", "--masks", str(masks / "w"), "--timesteps", "3", "--out",
         str(models / "w"), "--overwrite"],
        ["prune", "--method", "uniforget", "--model", "M", "--device", "cpu", "--memorized", "mem.csv", "--beta", "5",
         "--neutral", "n.txt", "--masks-out", str(masks / "u"), "--out", str(models / "u"), "--overwrite"],
        ["finetune", "--method", "plain", "--model", "M", "--device", "cpu", "--steps", "7", "--memorized", "own.csv",
         "--params", "unet", "--out", str(models / "p"), "--overwrite"],
    ]


def test_resume_with_changed_settings_is_refused_naming_the_setting(inputs, tmp_path):
    from memprune.benchmark.arms import parse_arms
    from memprune.benchmark.state import BenchmarkState
    from memprune.cli import main
    from memprune.commands.benchmark import command_options

    out = tmp_path / "bench"
    out.mkdir()
    arms = parse_arms(ARMS, command_options(main))
    BenchmarkState(out, {arm.name: arm.fingerprint() for arm in arms}, {"steps": 3}).save()
    result = run("benchmark", "--model", inputs["model"], "--arms", inputs["folder"] / "arms.toml", "--steps", 2,
                 "--out", out, "--resume")
    assert_refused(result, "the benchmark's steps was 3 and is now 2")
    # A setting the saved state lacks (an older memprune) counts as its default: per_model False is no change.
    from memprune.benchmark.run import BenchmarkSettings

    saved = BenchmarkSettings(model=str(inputs["model"]), steps=2).record()
    del saved["per_model"]
    BenchmarkState(out, {arm.name: arm.fingerprint() for arm in arms}, saved).save()
    again = run("benchmark", "--model", inputs["model"], "--arms", inputs["folder"] / "arms.toml", "--steps", 2,
                "--per-model", "--out", out, "--resume")
    assert_refused(again, "the benchmark's per_model was False and is now True")


def test_join_names_every_model_by_its_arm(tmp_path):
    """evaluate names the mitigation column by its method and attack a lone edited model "edited": the joined table
    names both by their arm; edit_seconds are the state's building seconds (0 for unedited and the mitigation)."""
    from memprune.benchmark.arms import parse_arms
    from memprune.benchmark.run import BenchmarkSettings, joined_metrics
    from memprune.benchmark.state import BenchmarkState
    from memprune.cli import main
    from memprune.commands.benchmark import command_options

    arms = parse_arms('[arms.cut]\nmethod = "wanda"\ncontrol = false\n[arms.guard]\nmethod = "wen"\n',
                      command_options(main))
    for stage, rows in (("evaluate", [("unedited", "memorized", "memorization_rate", 0.9),
                                      ("cut", "memorized", "memorization_rate", 0.5),
                                      ("wen", "memorized", "memorization_rate", 0.25)]),
                        ("attack", [("unedited", "memorized", "memorization_rate_attacked", 1.0),
                                    ("edited", "memorized", "memorization_rate_attacked", 0.75),
                                    ("edited", "memorized", "memorization_rate", 0.6)])):
        (tmp_path / stage).mkdir()
        pd.DataFrame(rows, columns=["model", "group", "metric", "value"]).to_csv(tmp_path / stage / "metrics.csv",
                                                                                 index=False)
    state = BenchmarkState(tmp_path, {}, {}, built={"cut": 12.5}, stages=["evaluate", "attack"])
    metrics = joined_metrics(arms, BenchmarkSettings(model="M"), state, ["cut"])
    value = metrics.set_index(["model", "group", "metric"]).value
    assert value["guard", "memorized", "memorization_rate"] == 0.25
    assert value["cut", "memorized", "memorization_rate_attacked"] == 0.75
    assert value["cut", "memorized", "memorization_rate"] == 0.5  # evaluate's, not the attack's baseline
    assert value["cut", "edit", "edit_seconds"] == 12.5 and value["guard", "edit", "edit_seconds"] == 0
    assert len(metrics) == 3 + 2 + 3


def test_output_and_arms_source_refusals(inputs, tmp_path):
    inside = bench(inputs, inputs["model"] / "bench")
    assert_refused(inside, "memprune never writes into a source")
    both = run("benchmark", "--model", inputs["model"], "--arms", inputs["folder"] / "arms.toml", "--preset",
               "testbed", "--out", tmp_path / "out")
    assert_refused(both, "Give --arms FILE or --preset NAME, not both.")
    neither = run("benchmark", "--model", inputs["model"], "--out", tmp_path / "out")
    assert_refused(neither, "Give the arms: --arms FILE")
    missing = run("benchmark", "--model", inputs["model"], "--arms", tmp_path / "no.toml", "--out", tmp_path / "out")
    assert_refused(missing, "does not exist")
    (tmp_path / "taken").mkdir()
    assert_refused(bench(inputs, tmp_path / "taken"), "already exists: pass --resume to continue that benchmark")
    assert not (tmp_path / "out").exists() and not (inputs["model"] / "bench").exists()


def test_nemo_per_prompt_scores_the_located_prompts_with_their_training_images(tmp_path):
    """compare_methods' NeMo per-prompt scenario: the memorized captions a locate used, each with its image."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("compare_methods", root / "bench" / "compare_methods.py")
    compare_methods = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_methods)
    model = tmp_path / "model"
    (model / "captions").mkdir(parents=True)
    (model / "images").mkdir()
    for name in ("0.png", "1.png", "2.png"):
        Image.new("RGB", (4, 4)).save(model / "images" / name)
    memorized = pd.DataFrame({"caption": ["hotel", "ship", "moon"],
                              "image": ["images/0.png", "images/1.png", "images/2.png"]})
    memorized.to_csv(model / "captions" / "memorized.csv", index=False)
    located = tmp_path / "located"
    located.mkdir()
    pd.DataFrame({"caption": ["moon", "hotel"]}).to_csv(located / "prompts_used.csv", index=False)
    written = pd.read_csv(compare_methods.located_memorized_file(model, located, tmp_path / "input"))
    assert written.caption.tolist() == ["hotel", "moon"]
    assert written.image.tolist() == [str((model / "images" / name).resolve()) for name in ("0.png", "2.png")]
