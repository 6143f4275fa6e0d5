"""Issue 'every result beside its control': the random control of the same size, k per row, malformed CSV,
model cards, and the demo's verdict against the control."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import DiffusionPipeline

from helpers import run
from memprune.control import random_control_of, tensor_generator, zeroed_counts
from memprune.errors import MemPruneError
from memprune.evaluation.metrics import calibrate_threshold, memorization_rate, strict_threshold
from memprune.masks import random_weight_indices
from memprune.methods.wanda import SelectionSettings, keep_count, ratio_for, select, wanda_mask
from memprune.model_card import render_card
from memprune.models import output_linears
from memprune.prompts import read_prompts
from memprune.stats import NeuronStats
from tiny_pipelines import sd1_pipeline

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------- random control

def edited_copy(pipe, zeros_per_layer: dict[str, int]):
    """A copy of pipe with the first n non-zero weights of some FF output linears zeroed (a known edit)."""
    import copy

    edited = copy.deepcopy(pipe)
    linears = output_linears(edited.unet)
    with torch.no_grad():
        for layer, count in zeros_per_layer.items():
            linears[layer].weight.view(-1)[:count] = 0
    return edited


def test_random_control_zeroes_the_same_count_per_tensor():
    pipe = sd1_pipeline()
    layers = list(output_linears(pipe.unet))
    edited = edited_copy(pipe, {layers[0]: 7, layers[1]: 3})
    counts = zeroed_counts(pipe.unet, edited.unet)
    assert counts == {f"{layers[0]}.net.2.weight": 7, f"{layers[1]}.net.2.weight": 3}  # by hand
    control, same_counts = random_control_of(pipe, edited, seed=5)
    assert same_counts == counts
    before, after = dict(pipe.unet.named_parameters()), dict(control.unet.named_parameters())
    for name in before:
        newly_zero = int(((after[name] == 0) & (before[name] != 0)).sum())
        assert newly_zero == counts.get(name, 0), name
        changed = after[name] != before[name]
        assert int(changed.sum()) == counts.get(name, 0)  # nothing else moved
    assert zeroed_counts(pipe.unet, control.unet) == counts
    # Seeded: the same seed picks the same weights, another seed others; the base model is untouched.
    name = f"{layers[0]}.net.2.weight"
    weight = before[name]
    first = random_weight_indices(weight, 7, tensor_generator(5, name), "nonzero", name)
    assert torch.equal(first, random_weight_indices(weight, 7, tensor_generator(5, name), "nonzero", name))
    assert not torch.equal(first, random_weight_indices(weight, 7, tensor_generator(6, name), "nonzero", name))
    assert torch.equal((after[name].view(-1) == 0).nonzero().squeeze(1), first)
    assert int((weight == 0).sum()) == 0


def test_no_control_for_an_edit_that_zeroes_nothing():
    pipe = sd1_pipeline()
    control, counts = random_control_of(pipe, sd1_pipeline())
    assert control is None and counts == {}
    with pytest.raises(MemPruneError, match="only"):
        random_weight_indices(torch.tensor([1.0, 0.0, 2.0]), 3, tensor_generator(0, "w"), "nonzero", "w")


# --------------------------------------------------------------------------------------------- strict threshold

def test_strict_threshold_by_hand():
    copy_similarity = {("unedited", "control"): np.array([[0.1, 0.3], [0.2, np.nan]]),
                       ("unedited", "other"): np.array([[0.9, 0.5]])}
    members = [("control", 0), ("control", 1), ("other", 0)]
    values = [0.1, 0.3, 0.2, 0.9, 0.5]  # NaN left out
    assert strict_threshold(copy_similarity, members, 95.0) == pytest.approx(np.percentile(values, 95))
    assert strict_threshold(copy_similarity, members, 50.0) == pytest.approx(0.3)
    assert strict_threshold({("unedited", "c"): np.full((2, 2), np.nan)}, [("c", 0)]) is None
    # A rate against each threshold on fixed similarities: 0.25 < x counts.
    memorized = np.array([0.2, 0.26, 0.31, 0.8])
    assert memorization_rate(memorized, 0.25) == 0.75
    assert memorization_rate(memorized, calibrate_threshold([0.1, 0.2, 0.3], 100)) == 0.5


# --------------------------------------------------------------------------------------------- k per row

@pytest.mark.parametrize("width", [256, 320, 512, 1280, 5120])
def test_k_per_row_from_ratio_and_back(width):
    for ratio in (0.01, 0.05, 0.1):
        k = keep_count(ratio, width)
        assert k == math.floor(ratio * width + 1e-9)
        assert keep_count(ratio_for(k, width), width) == k
    assert keep_count(0.01, 1280) == 12 and keep_count(0.01, 5120) == 51  # the paper's SD1.5 range
    assert keep_count(0.1, 256) == 25 and keep_count(0.1, 512) == 51  # the testbed's


def test_selection_by_k_per_row_records_k_per_layer():
    torch.manual_seed(0)
    weights = {"narrow": torch.randn(3, 8), "wide": torch.randn(4, 16)}
    memorized, reference = NeuronStats(), NeuronStats()
    for layer, weight in weights.items():
        weight[:, 0] = 0  # column 0 is the only one the reference is more active on: never in a row's top k
        width = weight.shape[1]
        memorized.update(layer, 0, torch.ones(5, width))  # equal activation on every column: score = |W|
        reference.update(layer, 0, torch.nn.functional.one_hot(torch.zeros(5, dtype=torch.long), width).float())
    masks = select(weights, memorized, reference, SelectionSettings(ratio=None, k_per_row=2))
    assert masks.meta["k_per_row"] == {"narrow": 2, "wide": 2}
    for layer, weight in weights.items():
        by_hand = torch.zeros_like(weight, dtype=torch.bool)
        for row, order in enumerate(weight.abs().argsort(dim=1, descending=True)):
            by_hand[row, order[:2]] = True  # the two largest |W| of each row
        assert torch.equal(masks.dense(layer, 0), by_hand)
    by_ratio = select(weights, memorized, reference, SelectionSettings(ratio=0.25))
    assert by_ratio.meta["k_per_row"] == {"narrow": 2, "wide": 4}
    # k = 2 on the narrow layer is ratio 0.25 there: the same mask.
    assert torch.equal(masks.dense("narrow", 0), by_ratio.dense("narrow", 0))
    a_mem, a_ref = memorized[("wide", 0)].wanda_norm, reference[("wide", 0)].wanda_norm
    assert torch.equal(wanda_mask(weights["wide"], a_mem, a_ref, k=4), by_ratio.dense("wide", 0))
    with pytest.raises(MemPruneError, match="larger than the width 8 of narrow"):
        select(weights, memorized, reference, SelectionSettings(ratio=None, k_per_row=9))
    for bad in ({"ratio": 0.1, "k_per_row": 2}, {"ratio": None, "k_per_row": 0}, {"ratio": None}):
        with pytest.raises(MemPruneError):
            SelectionSettings(**bad)


# --------------------------------------------------------------------------------------------- malformed CSV

@pytest.mark.parametrize("text, message", [
    ('caption,type\n"a dog,VM\nb cat,TM\n', "line 2 is malformed CSV (unexpected end of data)"),
    ('caption,type\na dog,VM\n"b cat,TM\nc,VM\n"d",TM\n', "line 3 is malformed CSV"),
    ('caption\na, dog\n', "line 2 has more fields than its header"),
    ('caption,type\na dog,VM\n"b\ncat",TM\n', "line 3: the caption runs over several lines (to line 4)"),
])
def test_malformed_csv_is_refused_with_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(MemPruneError) as error:
        read_prompts(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_well_formed_csv_with_quoted_delimiters_reads(tmp_path):
    path = tmp_path / "good.csv"
    path.write_text('caption,type\n"a dog, on grass",VM\n"say ""hi""",TM\n')
    assert read_prompts(path).prompts == ["a dog, on grass", 'say "hi"']


# --------------------------------------------------------------------------------------------- model card

def test_model_card_shows_edit_and_its_control():
    info = {"source": "data/testbed", "method": "wanda", "timesteps": 10, "total_zeroed": 120,
            "zeroed_weights": {"a": 100, "b": 20}, "zeroed_share": {"a": 0.1, "b": 0.02},
            "selection": {"ratio": 0.1}}
    metrics = pd.DataFrame([
        ("unedited", "memorized_held_out", "memorization_rate", 0.95),
        ("edited", "memorized_held_out", "memorization_rate", 0.65),
        ("random_control", "memorized_held_out", "memorization_rate", 0.9375),
        ("edited", "general", "attribute_accuracy", 0.84),
    ], columns=["model", "group", "metric", "value"])
    card = render_card(info, metrics, "edited", "runs/demo/evaluate")
    assert card.startswith("---\nlibrary_name: diffusers\nbase_model: data/testbed\n")
    assert "| metric | unedited | this model | random control, same size |" in card
    assert "| held-out memorized prompts: memorization rate | 95.0% | 65.0% | 93.8% |" in card
    assert "| general captions: attribute accuracy |  | 84.0% |  |" in card
    assert "Zeroed weights: 120 in 2 layers (mean share per layer 6.000%)" in card
    assert "DiffusionPipeline.from_pretrained" in card
    assert "Not evaluated yet" in render_card(info)


@pytest.mark.slow
def test_prune_writes_a_card_and_card_command_adds_numbers(saved_pipelines, tmp_path):
    prompts = tmp_path / "memorized.txt"
    prompts.write_text("a red circle\nthe cat\n")
    reference = tmp_path / "reference.txt"
    reference.write_text("the green dog\na blue square\n")
    model = saved_pipelines["sd1"]
    result = run("locate", "--model", model, "--memorized", prompts, "--steps", 2, "--k-per-row", 3, "--device", "cpu",
                 "--out", tmp_path / "loc")
    assert result.exit_code == 0, result.output
    assert "k = 3..3" in result.output
    assert set(json.loads((tmp_path / "loc" / "masks.json").read_text())["k_per_row"].values()) == {3}
    result = run("prune", "--model", model, "--masks", tmp_path / "loc", "--timesteps", 2, "--device", "cpu",
                 "--out", tmp_path / "pruned")
    assert result.exit_code == 0, result.output
    card = (tmp_path / "pruned" / "README.md").read_text()
    assert f"base_model: {model}" in card and "Not evaluated yet" in card
    DiffusionPipeline.from_pretrained(str(tmp_path / "pruned"))  # the card does not disturb stock loading
    result = run(
        "evaluate",
        "--model",
        model,
        "--edited",
        tmp_path / "pruned",
        "--memorized",
        prompts,
        "--reference",
        reference,
        "--steps",
        2,
        "--seeds",
        2,
        "--device",
        "cpu",
        "--grid-prompts",
        0,
        "--out",
        tmp_path / "ev",
    )
    assert result.exit_code == 0, result.output
    metrics = pd.read_csv(tmp_path / "ev" / "metrics.csv")
    assert "random_control" in set(metrics.model)
    result = run("card", tmp_path / "pruned", "--evaluation", tmp_path / "ev")
    assert result.exit_code == 0, result.output
    card = (tmp_path / "pruned" / "README.md").read_text()
    rate = metrics.query("model == 'edited' and group == 'memorized' and metric == 'memorization_rate'").value.iloc[0]
    assert f"| memorized prompts: memorization rate |  | {rate:.1%} |" in card
    result = run("card", tmp_path / "loc", "--evaluation", tmp_path / "ev")
    assert result.exit_code != 0 and "has no memprune.json" in result.output


# --------------------------------------------------------------------------------------------- demo verdict

def test_check_claim_compares_against_the_random_control(tmp_path):
    rows = []
    for model, rate, strict in (("unedited", 0.95, 0.99), ("edited", 0.05, 0.3), ("random_control", 0.9, 0.95)):
        rows += [(model, "memorized_held_out", "memorization_rate", rate),
                 (model, "memorized_held_out", "memorization_rate_strict", strict),
                 (model, "general", "attribute_accuracy", 0.85)]
    rows.append(("edited", "memorized", "seconds_per_image_ratio", 1.01))
    path = tmp_path / "metrics.csv"
    pd.DataFrame(rows, columns=["model", "group", "metric", "value"]).to_csv(path, index=False)
    script = str(ROOT / "scripts" / "check_claim.py")
    output = subprocess.run([sys.executable, script, str(path)], capture_output=True, text=True, check=True).stdout
    assert (
        "[holds] the edit beats a random mask of the same size: 5.0% vs 90.0% (strict threshold: 30.0% vs 95.0%"
        in output
    )
    assert "holds on this model." in output
    # The same edit, but the random control does as well: the verdict must not hold.
    frame = pd.read_csv(path)
    frame.loc[(frame.model == "random_control") & frame.metric.str.startswith("memorization"), "value"] = 0.1
    frame.to_csv(path, index=False)
    output = subprocess.run([sys.executable, script, str(path)], capture_output=True, text=True, check=True).stdout
    assert "[DOES NOT HOLD] the edit beats a random mask" in output and "does NOT hold" in output
