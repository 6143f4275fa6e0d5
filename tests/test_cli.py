"""The CLI end to end on a tiny saved pipeline, and every bad input: one sentence, non-zero exit, nothing written."""
import json

import pytest
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from helpers import assert_refused, run

LOCATE = ["locate", "--steps", "3", "--ratio", "0.1", "--batch-size", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def located(saved_pipelines, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    prompts = folder / "memorized.txt"
    prompts.write_text("a red circle\na blue square\nthe cat\n")
    out = folder / "run"
    result = run(*LOCATE, "--model", saved_pipelines["sd1"], "--memorized", prompts, "--out", out)
    assert result.exit_code == 0, result.output
    return {"prompts": prompts, "out": out, "folder": folder}


def test_locate_then_prune_end_to_end(located, saved_pipelines):
    out = located["out"]
    for name in ("masks.safetensors", "masks.json", "run.json", "stats/memorized.safetensors", "stats/reference.json"):
        assert (out / name).is_file(), name
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["settings"]["selection"]["ratio"] == 0.1 and "sha256" in run_info["inputs"]["memorized"]
    assert json.loads((out / "masks.json").read_text())["steps"] == [0, 1, 2]
    pruned = located["folder"] / "pruned"
    result = run("prune", "--model", saved_pipelines["sd1"], "--masks", out, "--timesteps", "2", "--out", pruned,
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "verified" in result.output
    info = json.loads((pruned / "memprune.json").read_text())
    assert info["timesteps"] == 2 and info["total_zeroed"] > 0
    StableDiffusionPipeline.from_pretrained(str(pruned))  # stock diffusers loads it


def test_same_command_twice_gives_identical_masks(located, saved_pipelines):
    again = located["folder"] / "again"
    result = run(*LOCATE, "--model", saved_pipelines["sd1"], "--memorized", located["prompts"], "--out", again)
    assert result.exit_code == 0, result.output
    first, second = load_file(str(located["out"] / "masks.safetensors")), load_file(str(again / "masks.safetensors"))
    assert first.keys() == second.keys() and all((first[k] == second[k]).all() for k in first)


def test_bad_model_inputs(located, tmp_path):
    prompts = located["prompts"]
    assert_refused(
        run(*LOCATE, "--model", tmp_path / "nope", "--memorized", prompts, "--out", tmp_path / "o"), "does not exist"
    )
    (tmp_path / "plain").mkdir()
    assert_refused(run(*LOCATE, "--model", tmp_path / "plain", "--memorized", prompts, "--out", tmp_path / "o"),
                   "not a diffusers pipeline")
    assert not (tmp_path / "o").exists()


def test_model_without_feedforwards(saved_pipelines, located, tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(str(saved_pipelines["sd1"]))
    pipe.unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type=None,
    )
    pipe.save_pretrained(str(tmp_path / "noff"))
    result = run(*LOCATE, "--model", tmp_path / "noff", "--memorized", located["prompts"], "--out", tmp_path / "o")
    assert_refused(result, "no FeedForward layers")


def test_bad_prompt_files(saved_pipelines, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    no_caption = tmp_path / "nocap.csv"
    no_caption.write_text("id,url\n1,http://x\n")
    model = saved_pipelines["sd1"]
    assert_refused(run(*LOCATE, "--model", model, "--memorized", empty, "--out", tmp_path / "o"), "holds no prompts")
    assert_refused(
        run(*LOCATE, "--model", model, "--memorized", no_caption, "--out", tmp_path / "o"), "no caption column"
    )
    assert_refused(run(*LOCATE, "--model", model, "--memorized", tmp_path / "missing.txt", "--out", tmp_path / "o"),
                   "does not exist")
    assert not (tmp_path / "o").exists()


def test_bad_ratio_timesteps_and_existing_output(saved_pipelines, located, tmp_path):
    model, prompts = saved_pipelines["sd1"], located["prompts"]
    for ratio in ("0", "1.5"):
        assert_refused(
            run(*LOCATE, "--model", model, "--memorized", prompts, "--ratio", ratio, "--out", tmp_path / "o"),
            f"Invalid value for '--ratio': {float(ratio)} is not in the range 0<x<=1",
        )
    # Every numeric option is range-checked before any work (a batch size of 0 once ended in ZeroDivisionError).
    for option, value in (("--batch-size", "0"), ("--steps", "0"), ("--seeds", "0"), ("--k-per-row", "0"),
                          ("--subset-size", "0"), ("--num-prompts", "0"), ("--seed", "-1")):
        assert_refused(run(*LOCATE, "--model", model, "--memorized", prompts, option, value, "--out", tmp_path / "o"),
                       f"Invalid value for '{option}'")
    assert_refused(run(*LOCATE, "--model", model, "--memorized", prompts, "--ratio", "0.1", "--k-per-row", "2",
                       "--out", tmp_path / "o"), "Give --ratio or --k-per-row, not both.")
    by_k = [arg for arg in LOCATE if arg not in ("--ratio", "0.1")]
    assert_refused(
        run(*by_k, "--model", model, "--memorized", prompts, "--k-per-row", "100000", "--out", tmp_path / "o"),
        "--k-per-row 100000 is larger than the width",
    )
    assert_refused(
        run("prune", "--model", model, "--masks", located["out"], "--timesteps", "4", "--out", tmp_path / "o"),
        "larger than the 3 steps",
    )
    assert_refused(run(*LOCATE, "--model", model, "--memorized", prompts, "--out", located["out"]), "already exists")
    assert_refused(
        run("prune", "--model", model, "--masks", tmp_path, "--out", tmp_path / "o"), "holds no masks.safetensors"
    )
    assert not (tmp_path / "o").exists()


def test_masks_for_another_model_are_refused(saved_pipelines, located, tmp_path):
    result = run("prune", "--model", saved_pipelines["sdxl"], "--masks", located["out"], "--out", tmp_path / "o")
    assert_refused(result, "made for another model")
    # Same layer names, another shape: edit the recorded shape of one layer.
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "masks.safetensors").write_bytes((located["out"] / "masks.safetensors").read_bytes())
    meta = json.loads((located["out"] / "masks.json").read_text())
    first = next(iter(meta["layers"]))
    meta["layers"][first] = [meta["layers"][first][0], meta["layers"][first][1] * 2]
    (masks / "masks.json").write_text(json.dumps(meta))
    result = run("prune", "--model", saved_pipelines["sd1"], "--masks", masks, "--out", tmp_path / "o")
    assert_refused(result, "has weight shape")
    assert not (tmp_path / "o").exists()


def test_output_inside_source_is_refused(saved_pipelines, located):
    model = saved_pipelines["sd1"]
    result = run("prune", "--model", model, "--masks", located["out"], "--out", model / "pruned", "--device", "cpu")
    assert_refused(result, "never writes into a source")
    assert not (model / "pruned").exists()


def test_locate_with_subsets_writes_overlap_and_plots(saved_pipelines, located, tmp_path):
    control = tmp_path / "control.txt"
    control.write_text("a photo of the dog\nthe white background\na green square\n")
    out = tmp_path / "overlap"
    result = run(*LOCATE, "--model", saved_pipelines["sd1"], "--memorized", located["prompts"], "--control", control,
                 "--subsets", 3, "--subset-size", 2, "--out", out)
    assert result.exit_code == 0, result.output
    import pandas as pd

    overlap = pd.read_csv(out / "overlap.csv")
    assert list(overlap.columns) == ["group_a", "group_b", "subset_a", "subset_b", "layer", "step", "iou"]
    pairs = overlap.groupby(["group_a", "group_b"]).size() // (7 * 3)  # 7 layers x 3 steps per pair of subsets
    assert pairs.to_dict() == {("memorized", "memorized"): 3, ("memorized", "non_memorized"): 9,
                               ("non_memorized", "non_memorized"): 3}
    assert overlap.iou.between(0, 1).all()
    for png in ("iou_heatmap.png", "iou_by_layer.png", "iou_by_step.png", "selected_share_by_layer.png"):
        assert (out / png).stat().st_size > 1000, png
    assert "memorized vs memorized" in result.output


def test_subsets_without_control_are_refused(saved_pipelines, located, tmp_path):
    result = run(*LOCATE, "--model", saved_pipelines["sd1"], "--memorized", located["prompts"], "--subsets", 2,
                 "--subset-size", 2, "--out", tmp_path / "o")
    assert_refused(result, "--control")


def test_label_filter_of_memorized_prompts(saved_pipelines, prompt_file, tmp_path):
    out = tmp_path / "vm"
    result = run(*LOCATE, "--model", saved_pipelines["sd1"], "--memorized", prompt_file, "--label", "VM", "--out", out)
    assert result.exit_code == 0, result.output
    assert "from 3 memorized prompts" in result.output  # 3 of the 4 rows are VM
    assert_refused(run(*LOCATE, "--model", saved_pipelines["sd1"], "--memorized", prompt_file, "--label", "XX",
                       "--out", tmp_path / "o"), "holds no prompts")


def test_prune_with_uniforget_trains_masks_then_prunes(saved_pipelines, located, tmp_path):
    neutral = tmp_path / "neutral.txt"
    neutral.write_text("a green square\nthe white background\n")
    out = tmp_path / "uf"
    result = run(
        "prune",
        "--model",
        saved_pipelines["sd1"],
        "--method",
        "uniforget",
        "--neutral",
        neutral,
        "--train-steps",
        2,
        "--lr",
        0.25,
        "--sampling-steps",
        3,
        "--timesteps",
        2,
        "--out",
        out,
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "uf-uniforget-masks" / "masks.safetensors").is_file()
    settings = json.loads((tmp_path / "uf-uniforget-masks" / "run.json").read_text())["settings"]
    assert (settings["lr"], settings["sampling_steps"], settings["train_steps"]) == (0.25, 3, 2)
    assert json.loads((out / "memprune.json").read_text())["timesteps"] == 2
    StableDiffusionPipeline.from_pretrained(str(out))
    assert_refused(run("prune", "--model", saved_pipelines["sd1"], "--out", tmp_path / "o"), "--masks is required")
