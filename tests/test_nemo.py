"""NeMo: z-scores, candidates, θ search and refinement against hand computation; hooks on tiny SD1/SDXL pipelines;
`locate --method nemo` then `prune` end to end; the refusal without non-memorized prompts."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from helpers import assert_refused, run
from memprune.masks import Masks
from memprune.methods import get
from memprune.methods.nemo_criterion import Deactivated, ValueRecorder, first_step, nemo_layers
from memprune.methods.nemo_search import (
    NeMoSettings,
    initial_candidates,
    neuron_masks,
    refine,
    search_theta,
    theta_schedule,
    zscores,
)
from memprune.models import value_linears
from memprune.stats import Moments
from tiny_pipelines import sd1_pipeline, sdxl_pipeline


def test_registered_as_weight_edit():
    assert get("nemo", "weight_edit").METHOD.kind == "weight_edit"


def test_zscores_against_numpy():
    rng = np.random.default_rng(0)
    activations, mean, std = rng.normal(size=6), rng.normal(size=6), rng.uniform(0.1, 2, size=6)
    std[2] = 0.0
    expected = (activations - mean) / np.where(std == 0, 1e-12, std)
    z = zscores(torch.tensor(activations), torch.tensor(mean), torch.tensor(std), two_sided=False)
    assert z.dtype == torch.float64
    np.testing.assert_allclose(z.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(zscores(torch.tensor(activations), torch.tensor(mean), torch.tensor(std)).numpy(),
                               np.abs(expected), rtol=1e-12)


def test_moments_merge_batches_like_numpy():
    rows = np.random.default_rng(1).normal(size=(11, 4))
    moments = Moments()
    for part in (rows[:3], rows[3:4], rows[4:]):
        moments.add(torch.tensor(part))
    np.testing.assert_allclose(moments.mean.numpy(), rows.mean(0), rtol=1e-12)
    np.testing.assert_allclose(moments.std.numpy(), rows.std(0, ddof=1), rtol=1e-12)


def test_initial_candidates_on_fixed_z():
    z = {"a": torch.tensor([0.5, 3.0, 6.0, 2.0]), "b": torch.tensor([1.0, 1.0])}
    assert initial_candidates(z, 2.5) == {"a": [1, 2], "b": []}
    assert initial_candidates(z, 0.9) == {"a": [1, 2, 3], "b": [0, 1]}
    activations = {"a": torch.tensor([-9.0, 0.0, 1.0, 0.5]), "b": torch.tensor([0.1, -0.2])}
    # top-k by |activation| joins the θ set: a's neuron 0 (|-9|), b's neuron 1 (|-0.2|)
    assert initial_candidates(z, 2.5, activations, k=1) == {"a": [0, 1, 2], "b": [1]}


def test_theta_schedule_is_theirs():
    pairs = theta_schedule(NeMoSettings())
    assert pairs[0] == (5.0, 0) and pairs[-1] == (1.0, 16) and len(pairs) == 17
    assert theta_schedule(NeMoSettings(theta=2.0, theta_step=0.5, min_theta=1.0, top_k_step=0)) == [
        (2.0, 0),
        (1.5, 0),
        (1.0, 0),
    ]


def test_search_stops_at_the_first_theta_that_breaks_memorization():
    z = {"a": torch.tensor([4.2, 3.1, 0.2, 2.6]), "b": torch.tensor([4.8, 1.2])}
    tried = []

    def broken(neurons):  # memorization breaks once a's neuron 3 (z = 2.6) is deactivated
        tried.append({k: list(v) for k, v in neurons.items()})
        return 3 in neurons["a"]

    settings = NeMoSettings(theta=5.0, theta_step=0.25, min_theta=1.0, top_k_step=0)
    result = search_theta(z, {}, broken, settings)
    assert result.broken and result.theta == 2.5 and result.candidates == {"a": [0, 1, 3], "b": [0]}
    assert tried[-1] == result.candidates and all(3 not in t["a"] for t in tried[:-1])
    # θ = 5.0 selects nothing and is skipped; a θ that adds no neuron is not judged again: the sets tried are
    # {b0} (θ 4.75), {a0, b0} (4.0), {a0, a1, b0} (3.0) and {a0, a1, a3, b0} (2.5), which breaks
    assert result.tries == len(tried) == 4
    assert tried[:3] == [{"a": [], "b": [0]}, {"a": [0], "b": [0]}, {"a": [0, 1], "b": [0]}]


def test_search_without_success_returns_the_last_candidates():
    z = {"a": torch.tensor([3.0, 1.5, 0.0])}
    result = search_theta(
        z, {}, lambda neurons: False, NeMoSettings(theta=2.0, theta_step=1.0, min_theta=1.0, top_k_step=0)
    )
    assert not result.broken and result.candidates == {"a": [0, 1]} and result.theta == 1.0 and result.tries == 2


def test_refine_keeps_exactly_the_needed_neurons():
    candidates = {"a": [0, 1, 2, 3], "b": [4, 5], "c": [7]}
    needed = {"a": {1, 3}, "c": {7}}
    calls = []

    def broken(neurons):
        calls.append(neurons)
        return all(rows <= set(neurons.get(layer, [])) for layer, rows in needed.items())

    assert broken(candidates)
    calls.clear()
    refined = refine(candidates, broken)
    assert refined == {"a": [1, 3], "b": [], "c": [7]}
    assert all(set(refined[layer]) <= set(candidates[layer]) for layer in candidates)
    # 3 layer trials (c, b, a; only b can go), then one trial per neuron left (c: 7; a: 0, 1, 2, 3)
    assert len(calls) == 3 + 5


def test_refine_of_alternatives_keeps_one():
    # Deactivating neuron 1 or neuron 2 alone breaks memorization: the greedy pass drops 1 (2 still breaks), keeps 2.
    refined = refine({"a": [1, 2]}, lambda neurons: bool({1, 2} & set(neurons["a"])))
    assert refined == {"a": [2]}


def test_neuron_masks_select_whole_rows_at_every_step():
    masks = neuron_masks({"v": [2, 0]}, {"v": (3, 4), "w": (2, 2)}, steps=3)
    assert masks.steps == [0, 1, 2] and masks.meta["step_independent"]
    expected = torch.zeros(3, 4, dtype=torch.bool)
    expected[[0, 2]] = True
    assert torch.equal(masks.union(3)["v"], expected) and torch.equal(masks.union(1)["v"], expected)
    assert not masks.union(2)["w"].any()


def _cross_attention_to_v_names(net):
    return {f"{name}.to_v" for name, module in net.named_modules() if name.endswith("attn2")}


@pytest.mark.parametrize("build", [sd1_pipeline, sdxl_pipeline], ids=["sd1", "sdxl"])
def test_recorder_finds_value_layers_by_type_and_removes_its_hooks(build):
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    linears = value_linears(pipe.unet)
    assert set(linears) == _cross_attention_to_v_names(pipe.unet) and linears
    down_mid = nemo_layers(pipe.unet, "down_mid")
    assert down_mid and set(down_mid) == {n for n in linears if n.startswith(("down_blocks.", "mid_block."))}
    with ValueRecorder(linears) as recorder:
        assert all(len(linear._forward_hooks) == 1 for linear in linears.values())
        first_step(pipe, ["a red circle", "the cat"], [0, 1], steps=2)
        rows = recorder.take()
    assert all(len(linear._forward_hooks) == 0 for linear in linears.values())
    name = next(iter(down_mid))
    assert rows[name].shape == (2, linears[name].out_features) and rows[name].dtype == torch.float64
    if build is sd1_pipeline:  # by hand: to_v applied to the text embedding, |.| averaged over the tokens
        with torch.no_grad():
            embeddings, _ = pipe.encode_prompt(["a red circle", "the cat"], "cpu", 1, False)
            expected = linears[name](embeddings).abs().mean(dim=1).double()
        torch.testing.assert_close(rows[name], expected, rtol=1e-5, atol=1e-6)


def test_deactivation_equals_zeroed_weight_rows():
    pipe = sd1_pipeline()
    pipe.set_progress_bar_config(disable=True)
    linears = nemo_layers(pipe.unet, "all")
    neurons = {name: [0, 3] for name in list(linears)[:2]}
    with Deactivated(linears, neurons):
        _, hooked = first_step(pipe, ["a red circle"], [0], steps=2)
    assert all(len(linear._forward_hooks) == 0 for linear in linears.values())
    _, plain = first_step(pipe, ["a red circle"], [0], steps=2)
    with torch.no_grad():
        for name, rows in neurons.items():
            linears[name].weight[rows] = 0
    _, zeroed = first_step(pipe, ["a red circle"], [0], steps=2)
    torch.testing.assert_close(hooked, zeroed)
    assert not torch.allclose(hooked, plain)


NEMO = ["locate", "--method", "nemo", "--steps", "10", "--seeds", "3", "--batch-size", "4", "--device", "cpu",
        "--theta", "2", "--theta-step", "0.5", "--min-theta", "0.5"]


@pytest.mark.slow
def test_locate_nemo_then_prune_zeroes_exactly_the_rows(saved_pipelines, tmp_path):
    prompts = tmp_path / "memorized.txt"
    prompts.write_text("a red circle\nthe cat\n")
    reference = tmp_path / "reference.txt"
    reference.write_text("a blue square\nthe dog\na photo of the cat\nthe green dog on white background\n")
    out = tmp_path / "nemo"
    result = run(
        *NEMO, "--model", saved_pipelines["sd1"], "--memorized", prompts, "--reference", reference, "--out", out
    )
    assert result.exit_code == 0, result.output
    for name in ("masks.safetensors", "masks.json", "prompts_used.csv", "run.json", "nemo_prompts.csv"):
        assert (out / name).is_file(), name
    masks = Masks.load(out)
    assert masks.steps == list(range(10))
    meta = json.loads((out / "masks.json").read_text())
    assert meta["selection"]["method"] == "nemo" and meta["step_independent"]
    neurons = {layer: rows for layer, rows in meta["nemo"]["neurons"].items() if rows}
    assert neurons, result.output  # the tiny model must give something to prune for this test to mean anything

    pruned = tmp_path / "pruned"
    result = run("prune", "--model", saved_pipelines["sd1"], "--masks", out, "--timesteps", "10", "--out", pruned,
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    before = load_file(str(saved_pipelines["sd1"] / "unet" / "diffusion_pytorch_model.safetensors"))
    after = StableDiffusionPipeline.from_pretrained(str(pruned)).unet.state_dict()
    assert set(before) == set(after)
    changed = set()
    for key, original in before.items():
        layer = key.removesuffix(".weight")
        if layer in neurons:
            rows = neurons[layer]
            assert torch.count_nonzero(after[key][rows]) == 0
            keep = [r for r in range(original.shape[0]) if r not in rows]
            assert torch.equal(after[key][keep], original[keep])
            changed.add(layer)
        else:
            assert torch.equal(after[key], original), key
    assert changed == set(neurons)
    info = json.loads((pruned / "memprune.json").read_text())
    assert info["total_zeroed"] == sum(
        len(rows) * before[f"{layer}.weight"].shape[1] for layer, rows in neurons.items()
    )


def test_reference_defaults_to_the_testbed_training_captions():
    from memprune.commands.locate import nemo_reference
    from memprune.errors import MemPruneError

    assert nemo_reference(None, None).endswith("captions/general_train.csv")  # never general_heldout.csv
    assert nemo_reference(None, "mine.csv") == "mine.csv"
    with pytest.raises(MemPruneError, match="NeMo needs non-memorized prompts"):
        nemo_reference(None, "empty")


def test_nemo_refuses_without_non_memorized_prompts(saved_pipelines, tmp_path):
    prompts = tmp_path / "memorized.txt"
    prompts.write_text("a red circle\n")
    for extra in ([], ["--reference", "empty"]):
        result = run(*NEMO, "--model", saved_pipelines["sd1"], "--memorized", prompts, "--out", tmp_path / "o", *extra)
        assert_refused(result, "NeMo needs non-memorized prompts")
        assert len([line for line in result.output.strip().splitlines() if line]) == 1
    assert not (tmp_path / "o").exists()


def test_threshold_is_calibrated_at_the_detection_guidance(monkeypatch):
    """Every criterion call — the threshold's non-memorized prompts and the memorized prompt alike — runs at the
    settings' guidance; the threshold equals mean + 1 std (ddof 1) of the pairwise MS-SSIM at that guidance by hand."""
    from memprune.methods import nemo_criterion
    from memprune.methods.nemo import NeMoRun
    from memprune.methods.nemo_criterion import noise_differences
    from memprune.methods.nemo_ssim import ms_ssim

    pipe = sd1_pipeline()
    pipe.set_progress_bar_config(disable=True)
    settings = NeMoSettings(seeds=3, steps=4, guidance_scale=3.0, batch_size=8)
    run = NeMoRun(pipe, settings, progress=False)
    guidances = []
    real = nemo_criterion.first_step

    def spy(pipe, prompts, seeds, steps, guidance_scale=1.0):
        guidances.append(guidance_scale)
        return real(pipe, prompts, seeds, steps, guidance_scale)

    monkeypatch.setattr("memprune.methods.nemo.first_step", spy)
    reference = ["the green dog", "a blue square"]
    threshold, info = run.calibrate_threshold(reference)
    assert guidances == [3.0, 3.0] and info["guidance_scale"] == 3.0
    values = []
    for prompt in reference:
        diffs = noise_differences(*real(pipe, [prompt] * 3, [0, 1, 2], 4, 3.0))
        values += [ms_ssim(diffs[i : i + 1], diffs[j : j + 1]).item() for i in range(3) for j in range(i + 1, 3)]
    assert threshold == pytest.approx(np.mean(values) + np.std(values, ddof=1), rel=1e-5)
    unguided = []
    for prompt in reference:
        diffs = noise_differences(*real(pipe, [prompt] * 3, [0, 1, 2], 4, 1.0))
        unguided += [ms_ssim(diffs[i : i + 1], diffs[j : j + 1]).item() for i in range(3) for j in range(i + 1, 3)]
    assert abs(threshold - (np.mean(unguided) + np.std(unguided, ddof=1))) > 1e-3  # the guidance matters here
    guidances.clear()
    run.locate_prompt("a red circle", run.reference_statistics(reference), threshold)
    # the statistics (one call: 2 prompts) and the prompt's activations without guidance (as theirs), then every
    # criterion call at the detection guidance
    assert guidances[:2] == [1.0, 1.0] and len(guidances) > 2 and set(guidances[2:]) == {3.0}


def test_per_prompt_mitigation_blocks_exactly_each_prompts_neurons(monkeypatch, tmp_path):
    """nemo_prompt: one call, each sample's value-layer outputs blocked at its own prompt's neurons only (hook check on
    the to_v outputs of both CFG halves), its image equal to that prompt generated alone from weights with those rows
    zeroed; a prompt without neurons is left alone."""
    import copy

    from memprune.generate import GenerationSettings, generate
    from memprune.methods import nemo_prompt
    from memprune.methods.nemo_prompt import NeMoPromptSettings, wrap

    pipe = sd1_pipeline()
    pipe.set_progress_bar_config(disable=True)
    linears = nemo_layers(pipe.unet, "all")
    names = list(linears)
    neurons = {"a red circle": {names[0]: [1, 2]}, "the green dog": {names[-1]: [3], names[1]: [0]}}
    (tmp_path / "masks.json").write_text(json.dumps({"nemo": {"prompts": [
        {"prompt": prompt, "neurons": rows} for prompt, rows in neurons.items()]}}))
    wrapped = wrap(pipe, NeMoPromptSettings.from_folder(tmp_path))
    seen, zero_columns = [], []
    real = nemo_prompt.PerSampleDeactivated

    class Spy(real):
        def __init__(self, linears, chosen):
            super().__init__(linears, chosen)
            seen.append(chosen)

        def _deactivate(self, output, layer):  # what each row of the edited output has at zero, per layer
            edited = super()._deactivate(output, layer)
            zero_columns.append((layer, [sorted(torch.nonzero((r == 0).all(0)).flatten().tolist()) for r in edited]))
            return edited

    monkeypatch.setattr(nemo_prompt, "PerSampleDeactivated", Spy)
    prompts = ["a red circle", "the green dog", "a photo of the cat"]
    settings = GenerationSettings(steps=3, seeds=1, batch_size=3)
    images = [image for _, _, image in generate(wrapped, prompts, settings, output_type="latent", progress=False)]
    assert seen == [[neurons["a red circle"], neurons["the green dog"], {}]]  # one call, each prompt its own
    assert zero_columns and {layer for layer, _ in zero_columns} == {names[0], names[1], names[-1]}
    for layer, rows in zero_columns:  # 6 rows: [uncond × 3, cond × 3], row r is prompt r mod 3's
        expected = [neurons.get(prompts[r % 3], {}).get(layer, []) for r in range(6)]
        assert rows == expected, layer
    assert [(r.prompt, r.neurons) for r in wrapped.records] == [("a red circle", 2), ("the green dog", 2),
                                                                ("a photo of the cat", 0)]
    plain = [image for _, _, image in generate(pipe, prompts, settings, output_type="latent", progress=False)]
    torch.testing.assert_close(images[2], plain[2], rtol=1e-4, atol=1e-4)  # batch of 1 vs 3: float rounding
    for index, prompt in enumerate(prompts[:2]):
        zeroed = copy.deepcopy(pipe)
        linears = nemo_layers(zeroed.unet, "all")
        with torch.no_grad():
            for layer, rows in neurons[prompt].items():
                linears[layer].weight[rows] = 0
        alone = next(generate(zeroed, [prompt], settings, output_type="latent", progress=False))[2]
        torch.testing.assert_close(images[index], alone, rtol=1e-4, atol=1e-5)
        assert (images[index] - plain[index]).abs().max() > 1e-3  # the blocking changes the generation


@pytest.mark.slow
def test_evaluate_nemo_per_prompt_column(saved_pipelines, tmp_path):
    """evaluate --mitigation nemo_prompt --nemo-neurons: a column scored on the memorized prompts themselves, its
    mitigation_neurons the mean count per image of each group (memorized: the located prompts' own; others: 0)."""
    model = saved_pipelines["sd1"]
    name = next(iter(nemo_layers(StableDiffusionPipeline.from_pretrained(str(model)).unet, "all")))
    located = tmp_path / "located"
    located.mkdir()
    (located / "masks.json").write_text(json.dumps({"nemo": {"prompts": [
        {"prompt": "a red circle", "neurons": {name: [0, 1, 2]}}, {"prompt": "the cat", "neurons": {}}]}}))
    (tmp_path / "memorized.txt").write_text("a red circle\nthe cat\n")
    (tmp_path / "reference.txt").write_text("the green dog\na photo of the dog\n")
    common = ("evaluate", "--model", model, "--memorized", tmp_path / "memorized.txt", "--reference",
              tmp_path / "reference.txt", "--steps", 2, "--seeds", 2, "--device", "cpu", "--grid-prompts", 0,
              "--mitigation", "nemo_prompt")
    result = run(*common, "--nemo-neurons", located, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    metrics = pd.read_csv(tmp_path / "out" / "metrics.csv")
    assert list(dict.fromkeys(metrics.model)) == ["unedited", "nemo_prompt"]
    value = lambda group, metric: metrics.query(  # noqa: E731
        "model == 'nemo_prompt' and group == @group and metric == @metric").value.iloc[0]
    assert value("memorized", "mitigation_neurons") == pytest.approx(1.5)  # 3 and 0 neurons
    assert value("non_memorized", "mitigation_neurons") == 0
    assert_refused(run(*common, "--out", tmp_path / "o2"), "--nemo-neurons")
    assert_refused(run(*common, "--nemo-neurons", tmp_path, "--out", tmp_path / "o3"), "masks.json")
