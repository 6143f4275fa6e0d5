"""Bad inputs of every command, at the command line (issue 27): each ends in one sentence naming the file, line or
option, a non-zero exit, no traceback and nothing written; and what killed runs leave is removed by the next run."""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import click
import numpy as np
import pytest
from PIL import Image

from helpers import assert_refused, run
from memprune.cli import main

DEAD_PID = 2**22 + 1  # larger than any PID: no process runs under it
FAST = ("--device", "cpu")


def one_sentence(output: str) -> str:
    """The refusal's text: click prints `Error: <sentence>` as the last line."""
    lines = [line for line in output.strip().splitlines() if line.startswith("Error")]
    assert len(lines) == 1, output
    sentence = lines[0].removeprefix("Error: ")
    assert sentence.endswith(".") and "Traceback" not in output, output
    return sentence


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def inputs(tmp_path):
    """A memorized file whose prompts have training images, a control file, and an empty-caption prompt file."""
    (tmp_path / "images").mkdir()
    noise = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    Image.fromarray(noise).save(tmp_path / "images" / "cat.png")
    Image.fromarray(noise[::-1]).save(tmp_path / "images" / "dog.png")
    (tmp_path / "attacked.csv").write_text("caption,image\nthe cat,images/cat.png\na blue square,\n")
    (tmp_path / "control.csv").write_text("caption,image\nthe green dog,images/dog.png\n")
    (tmp_path / "blank.csv").write_text('caption\n""\n"   "\n')
    (tmp_path / "retain.txt").write_text("the green dog\na yellow star\n")
    return tmp_path


# ------------------------------------------------------------------------------------ 1. all-blank prompt files
def commands_reading(model, files: Path, blank: Path, out: Path) -> dict[str, tuple]:
    """Every command that reads a prompt file, with `blank` in one of its prompt options."""
    memorized, retain = files / "attacked.csv", files / "retain.txt"
    return {
        "finetune --retain": ("finetune", "--model", model, "--memorized", memorized, "--retain", blank, "--out", out),
        "finetune --memorized": ("finetune", "--model", model, "--memorized", blank, "--retain", retain, "--out", out),
        "finetune --anchors": ("finetune", "--model", model, "--method", "doco", "--memorized", memorized, "--retain",
                               retain, "--anchors", blank, "--out", out),
        "locate --memorized": ("locate", "--model", model, "--memorized", blank, "--out", out),
        "locate --reference": ("locate", "--model", model, "--memorized", memorized, "--reference", blank, "--out",
                               out),
        "evaluate --reference": ("evaluate", "--model", model, "--memorized", memorized, "--reference", blank,
                                 "--out", out),
        "attack --prompts": ("attack", "--model", model, "--prompts", blank, "--threshold", 0.5, "--out", out),
        "detect --prompts": ("detect", "--model", model, "--prompts", blank, "--out", out.with_suffix(".csv")),
        "prune --neutral": ("prune", "--model", model, "--method", "uniforget", "--neutral", blank, "--out", out),
    }


@pytest.mark.parametrize("case", list(commands_reading("m", Path("f"), Path("b"), Path("o"))))
def test_a_prompt_file_of_blank_captions_is_refused_by_every_command(saved_pipelines, inputs, case):
    blank, out = inputs / "blank.csv", inputs / "out"
    result = run(*commands_reading(saved_pipelines["sd1"], inputs, blank, out)[case], *FAST)
    assert_refused(result, f"Prompt file '{blank}' holds only empty captions (2 rows)")
    one_sentence(result.output)
    assert not out.exists() and not out.with_suffix(".csv").exists()


def test_retain_images_with_only_empty_captions_are_refused(saved_pipelines, inputs):
    folder = inputs / "retain_images"
    folder.mkdir()
    shutil.copy(inputs / "images" / "cat.png", folder / "a.png")
    (folder / "a.txt").write_text("  \n")
    result = run("finetune", "--model", saved_pipelines["sd1"], "--memorized", inputs / "attacked.csv",
                 "--retain-images", folder, "--out", inputs / "out", *FAST)
    assert_refused(result, f"--retain-images '{folder}': every caption of its 1 images is empty")
    assert not (inputs / "out").exists()


# ------------------------------------------------------------------------------------ 2. unreadable retain image
@pytest.mark.parametrize("content", [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_retain_image_pil_cannot_read_is_named(saved_pipelines, inputs, content):
    folder = inputs / "retain_images"
    folder.mkdir()
    shutil.copy(inputs / "images" / "cat.png", folder / "a.png")
    (folder / "a.txt").write_text("a yellow star\n")
    (folder / "b.png").write_bytes(content)
    (folder / "b.txt").write_text("a green dog\n")
    result = run("finetune", "--model", saved_pipelines["sd1"], "--memorized", inputs / "attacked.csv",
                 "--retain-images", folder, "--out", inputs / "out", *FAST)
    assert_refused(result, f"Image '{folder / 'b.png'}' cannot be read as an image")
    one_sentence(result.output)
    assert not (inputs / "out").exists()


def test_retain_captions_that_are_not_utf8_are_named(saved_pipelines, inputs):
    folder = inputs / "retain_images"
    folder.mkdir()
    shutil.copy(inputs / "images" / "cat.png", folder / "a.png")
    (folder / "metadata.csv").write_bytes(b"file_name,caption\na.png,caf\xe9\n")
    result = run("finetune", "--model", saved_pipelines["sd1"], "--memorized", inputs / "attacked.csv",
                 "--retain-images", folder, "--out", inputs / "out", *FAST)
    assert_refused(result, f"Caption file '{folder / 'metadata.csv'}' is not UTF-8 text.")


# ------------------------------------------------------------------------------------ 3. counts beyond what exists
def test_num_prompts_beyond_the_prompts_is_refused_alike_by_attack_and_locate(saved_pipelines, inputs, prompt_file):
    model, out = saved_pipelines["sd1"], inputs / "out"
    attack = run("attack", "--model", model, "--prompts", inputs / "attacked.csv", "--threshold", 0.5,
                 "--num-prompts", 5, "--out", out, *FAST)
    assert_refused(attack, f"--num-prompts 5 is more than the 1 prompts of '{inputs / 'attacked.csv'}' to attack "
                           "(with a training image): give at most 1.")
    locate = run("locate", "--model", model, "--memorized", prompt_file, "--num-prompts", 9, "--out", out, *FAST)
    assert_refused(locate, f"--num-prompts 9 is more than the 4 memorized prompts in '{prompt_file}': give at most 4.")
    subsets = run("locate", "--model", model, "--memorized", prompt_file, "--subsets", 2, "--subset-size", 6,
                  "--control", prompt_file, "--out", out, *FAST)
    assert_refused(subsets, "--subset-size 6 is more than the 4 memorized prompts in")
    nemo = run("locate", "--model", model, "--method", "nemo", "--memorized", prompt_file, "--reference",
               inputs / "retain.txt", "--num-prompts", 9, "--out", out, *FAST)
    assert_refused(nemo, f"--num-prompts 9 is more than the 4 memorized prompts in '{prompt_file}': give at most 4.")
    for result in (attack, locate, subsets, nemo):
        one_sentence(result.output)
    assert not out.exists()


# ------------------------------------------------------------------------------------ 4. nan and inf
def float_options() -> list[tuple[tuple[str, ...], str]]:
    """(command path, option) for every float option of every command, read from the click command tree."""
    found = []

    def walk(command: click.Command, path: tuple[str, ...]) -> None:
        if isinstance(command, click.Group):
            for name, sub in sorted(command.commands.items()):
                walk(sub, (*path, name))
            return
        for param in command.params:
            if isinstance(param, click.Option) and isinstance(param.type, (click.types.FloatParamType,
                                                                           click.FloatRange)):
                found.append((path, max(param.opts, key=len)))

    walk(main, ())
    return found


def test_the_command_tree_has_float_options():
    options = float_options()
    assert (("attack",), "--threshold") in options and (("evaluate",), "--wen-target") in options
    assert len(options) >= 20


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("path,option", float_options(), ids=lambda x: "-".join(x) if isinstance(x, tuple) else x)
def test_every_float_option_refuses_nan_and_inf(path, option, value):
    result = run(*path, option, value)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert errors == [f"Error: Invalid value for '{option}': '{value}' is not a finite number."], result.output


# ------------------------------------------------------------------------------------ 5. --threshold-from
def evaluate_folder(parent: Path, metrics: bytes | str | None = None, run_json: bytes | str | None = None) -> Path:
    folder = parent / "evaluation"
    folder.mkdir()
    metrics = "model,group,metric,value\nunedited,same_style_control,copy_threshold,0.25\n" if metrics is None \
        else metrics
    for name, content in (("metrics.csv", metrics), ("run.json", run_json)):
        if content is not None:
            path = folder / name
            path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return folder


BAD_EVALUATIONS = {
    "binary metrics.csv": (b"\x89PNG\r\n\x1a\n\xff\xfe\x00", None, "metrics.csv' is not UTF-8 text"),
    "metrics.csv without columns": ("a,b\n1,2\n", None, "metrics.csv' has no model, group, metric, value columns"),
    "metrics.csv without model": ("group,metric,value\nx,copy_threshold,0.2\n", None,
                                  "metrics.csv' has no model column"),
    "unparsable metrics.csv": ('model,group,metric,value\n"unedited,x\n', None, "metrics.csv' is not a readable CSV"),
    "value not a number": ("model,group,metric,value\nunedited,x,copy_threshold,high\n", None,
                           "metrics.csv' line 2 has a value that is not a number ('high')"),
    "binary run.json": (None, b"\xff\xfe\x00\x01", "run.json' is not UTF-8 text"),
    "corrupt run.json": (None, '{"settings": ', "run.json' is not valid JSON (line 1"),
    "run.json a list": (None, "[1, 2]", "run.json' holds a JSON list, not an object"),
}


@pytest.mark.parametrize("case", list(BAD_EVALUATIONS))
def test_threshold_from_a_folder_that_is_not_an_evaluate_output(saved_pipelines, inputs, case):
    metrics, run_json, message = BAD_EVALUATIONS[case]
    folder = evaluate_folder(inputs, metrics, run_json)
    result = run("attack", "--model", saved_pipelines["sd1"], "--prompts", inputs / "attacked.csv",
                 "--threshold-from", folder, "--out", inputs / "out", *FAST)
    assert_refused(result, message)
    assert str(folder) in one_sentence(result.output)
    assert not (inputs / "out").exists()


def test_a_nan_copy_threshold_in_an_evaluate_folder_is_refused(saved_pipelines, inputs):
    folder = evaluate_folder(inputs, "model,group,metric,value\nunedited,x,copy_threshold,nan\n")
    result = run("attack", "--model", saved_pipelines["sd1"], "--prompts", inputs / "attacked.csv",
                 "--threshold-from", folder, "--out", inputs / "out", *FAST)
    assert_refused(result, "has a copy_threshold of nan, not a finite number")


def test_evaluate_names_a_corrupt_memprune_json_of_an_edited_folder(saved_pipelines, inputs, prompt_file):
    edited = inputs / "edited"
    shutil.copytree(saved_pipelines["sd1"], edited)
    for content, message in ((b"\xff\xfe\x00", "is not UTF-8 text"), ("{", "is not valid JSON"),
                             ('"text"', "holds a JSON str, not an object")):
        path = edited / "memprune.json"
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        result = run("evaluate", "--model", saved_pipelines["sd1"], "--edited", edited, "--memorized", prompt_file,
                     "--reference", inputs / "retain.txt", "--out", inputs / "out", *FAST)
        assert_refused(result, f"'{path}' {message}")
        one_sentence(result.output)
    assert not (inputs / "out").exists()


# ------------------------------------------------------------------------------------ 8. memprune card
CARD_CASES = {
    "corrupt metrics.csv": ("metrics.csv", b"\xff\xd8\xff\xe0binary", "metrics.csv' is not UTF-8 text"),
    "metrics.csv without model": ("metrics.csv", "group,metric,value\nx,y,1\n", "metrics.csv' has no model column"),
    "corrupt memprune.json": ("memprune.json", '{"source": ', "memprune.json' is not valid JSON"),
    "memprune.json not an object": ("memprune.json", '["wanda"]', "memprune.json' holds a JSON list, not an object"),
    "binary memprune.json": ("memprune.json", b"\x00\xff", "memprune.json' is not UTF-8 text"),
    "corrupt run.json": ("run.json", "{", "run.json' is not valid JSON"),
}


@pytest.mark.parametrize("case", list(CARD_CASES))
def test_card_refuses_corrupt_inputs_in_one_sentence_and_leaves_the_folder_as_it_was(tmp_path, case):
    name, content, message = CARD_CASES[case]
    folder, evaluation = tmp_path / "pruned", tmp_path / "evaluation"
    folder.mkdir()
    evaluation.mkdir()
    (folder / "memprune.json").write_text(json.dumps({"source": "model", "method": "wanda"}))
    (folder / "README.md").write_text("the card before\n")
    (evaluation / "metrics.csv").write_text("model,group,metric,value\nedited,memorized,memorization_rate,0.5\n")
    (evaluation / "run.json").write_text(json.dumps({"settings": {"edited": str(folder)}}))
    target = (folder if name == "memprune.json" else evaluation) / name
    target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    before = listing(tmp_path)
    result = run("card", folder, "--evaluation", evaluation)
    assert_refused(result, message)
    assert str(target) in one_sentence(result.output)
    assert listing(tmp_path) == before  # no stray .README.* temporary file
    assert (folder / "README.md").read_text() == "the card before\n"


# ------------------------------------------------------------------------------------ a located folder
@pytest.fixture(scope="module")
def located(saved_pipelines, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_inputs_located")
    prompts = folder / "memorized.txt"
    prompts.write_text("a red circle\nthe cat\n")
    out = folder / "loc"
    result = run("locate", "--model", saved_pipelines["sd1"], "--memorized", prompts, "--steps", 2, "--ratio", 0.1,
                 "--out", out, "--resume", *FAST)
    assert result.exit_code == 0, result.output
    return {"folder": folder, "out": out, "prompts": prompts, "output": result.output}


# ------------------------------------------------------------------------------------ 6. --resume with nothing
def test_locate_resume_without_a_partial_run_says_so(located):
    partial = located["folder"] / "loc.partial"
    lines = [line for line in located["output"].splitlines() if line.startswith("--resume")]
    assert lines == [f"--resume: no interrupted run to continue in '{partial}'; starting from the beginning."]
    assert not partial.exists()


# ------------------------------------------------------------------------------------ 7. folders of killed runs
def killed_run(parent: Path, name: str) -> Path:
    leftover = parent / f".{name}.tmp-{DEAD_PID}-x"
    (leftover / "unet").mkdir(parents=True)
    (leftover / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 100)
    return leftover


def removed_line(output: str, out: Path, leftover: Path) -> None:
    lines = [line for line in output.splitlines() if line.startswith("Removed")]
    assert lines == [f"Removed 1 temporary folder that an interrupted run with --out {out} left: {leftover.name}."], \
        output
    assert not leftover.exists()


def test_the_next_prune_removes_a_killed_runs_folder_and_says_so(saved_pipelines, located, tmp_path):
    out = tmp_path / "pruned"
    leftover = killed_run(tmp_path, "pruned")
    live = tmp_path / f".pruned.tmp-{os.getpid()}-live"  # a run in progress: never touched
    live.mkdir()
    result = run("prune", "--model", saved_pipelines["sd1"], "--masks", located["out"], "--timesteps", 2, "--out",
                 out, *FAST)
    assert result.exit_code == 0, result.output
    removed_line(result.output, out, leftover)
    assert live.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "pruned"])


def test_the_next_detect_removes_a_killed_runs_staging(saved_pipelines, prompt_file, tmp_path, umask_022):
    out = tmp_path / "scores.csv"
    leftover = tmp_path / f".scores.csv.run-{DEAD_PID}-abcd"
    leftover.mkdir()
    (leftover / "scores.csv").write_text("half written")
    result = run("detect", "--model", saved_pipelines["sd1"], "--prompts", prompt_file, "--steps", 2, "--out", out,
                 *FAST)
    assert result.exit_code == 0, result.output
    removed_line(result.output, out, leftover)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memorized.csv", "scores.csv", "scores.json"]
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(out.with_suffix(".json").stat().st_mode) == 0o644


@pytest.mark.parametrize("command", ["finetune", "locate", "evaluate", "attack", "prune --method uniforget"])
def test_every_command_removes_what_killed_runs_left_and_says_so(saved_pipelines, inputs, command):
    """The removal comes with the output check, before any work: a run refused later for a bad input (here an
    all-blank prompt file, to keep the test fast) has already removed and reported them."""
    model, out, blank = saved_pipelines["sd1"], inputs / "out", inputs / "blank.csv"
    args = {
        "finetune": ("finetune", "--model", model, "--memorized", inputs / "attacked.csv", "--retain", blank),
        "locate": ("locate", "--model", model, "--memorized", blank),
        "evaluate": ("evaluate", "--model", model, "--memorized", inputs / "attacked.csv", "--reference", blank),
        "attack": ("attack", "--model", model, "--prompts", blank, "--threshold", 0.5),
        "prune --method uniforget": ("prune", "--model", model, "--method", "uniforget", "--neutral", blank),
    }[command]
    leftover = killed_run(inputs, "out")
    result = run(*args, "--out", out, *FAST)
    assert_refused(result, "holds only empty captions")
    removed_line(result.output, out, leftover)
    assert not out.exists()


# ------------------------------------------------------------------------------------ 9. --masks FILE
def test_prune_masks_that_is_a_file_is_named(saved_pipelines, tmp_path):
    given = tmp_path / "masks.txt"
    given.write_text("not masks")
    result = run("prune", "--model", saved_pipelines["sd1"], "--masks", given, "--out", tmp_path / "out", *FAST)
    assert_refused(result, f"'{given}' is a file, not a folder of masks")
    one_sentence(result.output)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ 10. permissions
@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_a_pruned_folder_gets_the_permissions_of_an_ordinary_save(saved_pipelines, located, tmp_path, umask_022):
    out = tmp_path / "pruned"
    result = run("prune", "--model", saved_pipelines["sd1"], "--masks", located["out"], "--timesteps", 2, "--out",
                 out, *FAST)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for path in out.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path
    assert (out / "README.md").is_file() and any(out.rglob("*.safetensors"))


# ------------------------------------------------------------------------------------ 11. lines printed once
def test_evaluate_and_attack_print_backend_threshold_and_wen_lines_once(saved_pipelines, inputs):
    model = saved_pipelines["sd1"]
    evaluate = run("evaluate", "--model", model, "--memorized", inputs / "attacked.csv", "--reference",
                   inputs / "control.csv", "--steps", 1, "--seeds", 2, "--grid-prompts", 0, "--no-random-control",
                   "--no-attributes", "--mitigation", "wen", "--wen-iterations", 1, "--out", inputs / "ev", *FAST)
    assert evaluate.exit_code == 0, evaluate.output
    for start in ("Similarity backend:", "Copy threshold", "Wen mitigation target"):
        assert sum(start in line for line in evaluate.output.splitlines()) == 1, (start, evaluate.output)
    attack = run("attack", "--model", model, "--prompts", inputs / "attacked.csv", "--control", inputs / "control.csv",
                 "--steps", 1, "--seeds", 2, "--attack-steps", 1, "--noise-samples", 1, "--out", inputs / "at", *FAST)
    assert attack.exit_code == 0, attack.output
    for start in ("Similarity backend:", "Copy threshold:"):
        assert sum(start in line for line in attack.output.splitlines()) == 1, (start, attack.output)


# ------------------------------------------------------------------------------------ the same classes elsewhere
def test_resume_from_a_corrupt_partial_settings_file_is_named(saved_pipelines, prompt_file, tmp_path):
    settings = tmp_path / "out.partial" / "settings.json"
    settings.parent.mkdir()
    settings.write_text('{"command": "loc')
    result = run("locate", "--model", saved_pipelines["sd1"], "--memorized", prompt_file, "--resume", "--out",
                 tmp_path / "out", *FAST)
    assert_refused(result, f"'{settings}' is not valid JSON")
    assert f"delete '{settings.parent}' to start over" in one_sentence(result.output)
    assert not (tmp_path / "out").exists()


def test_attack_names_a_corrupt_model_index_of_an_edited_folder(saved_pipelines, inputs):
    edited = inputs / "edited"
    shutil.copytree(saved_pipelines["sd1"], edited)
    (edited / "model_index.json").write_bytes(b"\x00\xff not json")
    result = run("attack", "--model", saved_pipelines["sd1"], "--edited", edited, "--prompts", inputs / "attacked.csv",
                 "--threshold", 0.5, "--out", inputs / "out", *FAST)
    assert_refused(result, f"'{edited / 'model_index.json'}' is not UTF-8 text")
    one_sentence(result.output)
    assert not (inputs / "out").exists()


def test_finetune_says_when_retain_prompts_asks_for_more_captions_than_the_file_holds(saved_pipelines, inputs):
    out = inputs / "tuned"
    result = run("finetune", "--model", saved_pipelines["sd1"], "--memorized", inputs / "attacked.csv", "--retain",
                 inputs / "retain.txt", "--retain-prompts", 5, "--steps", 1, "--batch-size", 2, "--sampling-steps", 1,
                 "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    note = "--retain-prompts 5 is more than the 2 retain captions: all 2 were used."
    assert f"Note: {note}" in result.output
    assert json.loads((out / "memprune.json").read_text())["notes"] == [note]
