"""UniForget's default masks (the paper's relaxation σ(0.4·M+1) on FeedForward neurons and normalisation channels):
mask values, layer set, penalty and binarisation by hand; only the declared weights change when pruned."""
import json
import math

import pytest
import torch
from diffusers import StableDiffusionPipeline
from torch import nn

from helpers import assert_refused, run
from memprune.commands.prune import prune_to_folder
from memprune.commands.uniforget import uniforget_to_folder
from memprune.methods.uniforget import UniForgetSettings, train_gates
from memprune.methods.uniforget_relax import (
    NORM_CHANNELS_FILE,
    RelaxedMasks,
    load_norm_channels,
    norm_layers,
    relaxed_mask,
)
from memprune.models import denoiser, output_linears
from tiny_pipelines import sd1_pipeline, sdxl_pipeline

NEUTRAL = ["a red circle", "a blue square", "the green dog", "a photo of the cat"]
MEMORIZED = ["a white circle on the background"]
FAST = dict(train_steps=3, sampling_steps=2, batch_size=2, steps=2, progress=False)


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_relaxed_mask_is_sigmoid_of_0_4_m_plus_1_by_hand():
    logits = torch.tensor([-5.0, -2.5, 0.0, 1.0, 4.0], dtype=torch.float64)
    by_hand = [_sigmoid(0.4 * m + 1) for m in logits.tolist()]
    assert relaxed_mask(logits).tolist() == pytest.approx(by_hand, abs=1e-12)
    assert relaxed_mask(torch.tensor(0.0)).item() == pytest.approx(0.7310586, abs=1e-6)  # σ(1): starts near-open
    assert relaxed_mask(torch.tensor(-2.5)).item() == pytest.approx(0.5)  # the binarisation edge


def test_masks_scale_ffn_neurons_and_norm_channels_by_the_relaxed_value():
    net = denoiser(sd1_pipeline())
    masks = RelaxedMasks.for_denoiser(net)
    feedforwards = {n: m for n, m in net.named_modules() if n in masks.ffn}
    ffn_name = masks.layers[0]
    gn_name = next(n for n, m in norm_layers(net).items() if isinstance(m, nn.GroupNorm))
    ln_name = next(n for n, m in norm_layers(net).items() if isinstance(m, nn.LayerNorm))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in masks.parameters():
            m.copy_(torch.randn(m.shape, generator=generator) * 3)

    def hand(logits):  # σ(0.4·M + 1), one float at a time
        return torch.tensor([_sigmoid(0.4 * v + 1) for v in logits.tolist()])

    ff, gn, ln = feedforwards[ffn_name], norm_layers(net)[gn_name], norm_layers(net)[ln_name]
    x_ff = torch.randn(2, 5, output_linears(net)[ffn_name].out_features, generator=generator)
    x_gn = torch.randn(2, gn.num_channels, 3, 3, generator=generator)
    x_ln = torch.randn(2, 5, ln.normalized_shape[0], generator=generator)
    with torch.no_grad():
        hidden = x_ff
        for module in list(ff.net)[:-1]:  # everything before the output Linear: the hidden neurons
            hidden = module(hidden)
        expected_ff = output_linears(net)[ffn_name](hidden * hand(masks.ffn[ffn_name]))
        expected_gn = gn(x_gn) * hand(masks.norms[gn_name]).view(1, -1, 1, 1)
        expected_ln = ln(x_ln) * hand(masks.norms[ln_name])
        with masks.apply(net):
            got_ff, got_gn, got_ln = ff(x_ff), gn(x_gn), ln(x_ln)
    torch.testing.assert_close(got_ff, expected_ff)
    torch.testing.assert_close(got_gn, expected_gn)
    torch.testing.assert_close(got_ln, expected_ln)
    assert not torch.allclose(got_gn, gn(x_gn).detach())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in (output_linears(net)[ffn_name], gn, ln))


@pytest.mark.parametrize("make", [sd1_pipeline, sdxl_pipeline], ids=["sd1", "sdxl"])
def test_default_layer_set_is_ffn_and_every_affine_norm_found_by_type(make):
    assert UniForgetSettings().gates == "sigmoid" and UniForgetSettings().layers == ("ffn", "norm")
    net = denoiser(make())
    by_type = {n for n, m in net.named_modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))}
    masks = RelaxedMasks.for_denoiser(net)
    assert set(masks.norms) == by_type and "conv_norm_out" in masks.norms
    assert {type(m) for m in norm_layers(net).values()} == {nn.GroupNorm, nn.LayerNorm}
    assert set(masks.ffn) == set(output_linears(net))
    assert all(masks.norms[n].numel() == m.weight.numel() for n, m in norm_layers(net).items())
    # by type, not by name: a renamed GroupNorm is found, a Linear called "norm" is not
    net.add_module("renamed", nn.GroupNorm(1, 4))
    net.add_module("fake_norm", nn.Linear(2, 2))
    net.add_module("plain_ln", nn.LayerNorm(4, elementwise_affine=False))  # nothing to zero: no mask
    assert "renamed" in norm_layers(net) and "fake_norm" not in norm_layers(net) and "plain_ln" not in norm_layers(net)


def test_penalty_is_the_mean_relaxed_mask_by_hand_and_enters_the_loss():
    masks = RelaxedMasks({"a": 2}, {"n": 3})
    values = {"a": [0.0, -4.0], "n": [1.0, 2.0, -1.0]}
    with torch.no_grad():
        masks.ffn["a"].copy_(torch.tensor(values["a"]))
        masks.norms["n"].copy_(torch.tensor(values["n"]))
    hand = sum(_sigmoid(0.4 * v + 1) for v in values["a"] + values["n"]) / 5
    assert masks.penalty().item() == pytest.approx(hand, rel=1e-6)
    result = train_gates(sd1_pipeline(), NEUTRAL, UniForgetSettings(beta=3.0, **FAST), MEMORIZED)
    history = result.history
    assert list(history.columns) == ["step", "loss", "mse", "mask_mean", "closed_share"]
    assert history["mask_mean"].iloc[0] == pytest.approx(_sigmoid(1.0), rel=1e-6)  # every M starts at 0
    for row in history.itertuples():
        assert row.loss == pytest.approx(row.mse + 3.0 * row.mask_mean, rel=1e-5)


def test_binarisation_prunes_masks_at_or_below_one_half():
    pipe = sd1_pipeline()
    net = denoiser(pipe)
    masks = RelaxedMasks.for_denoiser(net)
    ffn, norm = masks.layers[0], "conv_norm_out"
    with torch.no_grad():
        masks.ffn[ffn][[0, 3]] = -2.6  # σ(-0.04) < 0.5: pruned
        masks.ffn[ffn][1] = -2.4  # σ(0.04) > 0.5: kept
        masks.norms[norm][[2]] = -10.0
    assert masks.closed()[ffn].nonzero().squeeze(1).tolist() == [0, 3]
    assert {k: v.tolist() for k, v in masks.closed_norm_channels().items()} == {norm: [2]}
    share = masks.pruned_share().set_index("layer")
    assert share.loc[ffn, "pruned"] == 2 and share.loc[norm, "kind"] == "norm" and share.loc[norm, "pruned"] == 1


def _state(pipe):
    return {f"{c}.{k}": v.detach().clone() for c, m in pipe.components.items() if isinstance(m, nn.Module)
            for k, v in m.state_dict().items()}


def test_training_changes_no_weight_and_pruning_changes_only_declared_ones(saved_pipelines, prompt_file, tmp_path):
    pipe = sd1_pipeline()
    before = _state(pipe)
    result = train_gates(pipe, NEUTRAL, UniForgetSettings(beta=5.0, **{**FAST, "train_steps": 8}), MEMORIZED)
    assert all(torch.equal(v, _state(pipe)[k]) for k, v in before.items())  # training moves only the logits
    assert result.norm_channels and result.pruned_share > 0

    neutral = tmp_path / "neutral.txt"
    neutral.write_text("a green circle\na white square\nthe dog on the background\n")
    masks_dir, out = tmp_path / "uf", tmp_path / "pruned"
    settings = UniForgetSettings(beta=5.0, train_steps=8, sampling_steps=2, steps=2, progress=False)
    summary = uniforget_to_folder(str(saved_pipelines["sd1"]), str(neutral), masks_dir, settings,
                                  memorized=str(prompt_file), device="cpu")
    assert "normalisation channels" in summary and "sigmoid masks" in summary
    assert (masks_dir / NORM_CHANNELS_FILE).is_file()
    channels = load_norm_channels(masks_dir)
    assert channels and sum(v.numel() for v in channels.values()) > 0
    assert "norm" in prune_to_folder(str(saved_pipelines["sd1"]), masks_dir, out, timesteps=2, device="cpu")
    info = json.loads((out / "memprune.json").read_text())
    assert info["norm_channels_zeroed"] == {k: int(v.numel()) for k, v in channels.items()}
    source = denoiser(StableDiffusionPipeline.from_pretrained(str(saved_pipelines["sd1"]))).state_dict()
    edited = denoiser(StableDiffusionPipeline.from_pretrained(str(out))).state_dict()
    ffn_weights = {f"{name}.weight" for name in (f"{n}.net.2" for n in output_linears(denoiser(pipe)))}
    norm_params = {f"{n}.{p}" for n in channels for p in ("weight", "bias")}
    changed = {k for k in source if not torch.equal(source[k], edited[k])}
    assert changed <= ffn_weights | norm_params and changed & norm_params
    for name, idx in channels.items():
        for p in ("weight", "bias"):
            keep = torch.ones(source[f"{name}.{p}"].numel(), dtype=torch.bool)
            keep[idx] = False
            assert torch.count_nonzero(edited[f"{name}.{p}"][idx]) == 0
            assert torch.equal(edited[f"{name}.{p}"][keep], source[f"{name}.{p}"][keep])


def test_cli_gates_option_and_bad_layer_choice(saved_pipelines, tmp_path):
    neutral = tmp_path / "neutral.txt"
    neutral.write_text("a green square\nthe white background\n")
    common = ("prune", "--model", saved_pipelines["sd1"], "--method", "uniforget", "--neutral", neutral,
              "--train-steps", 1, "--sampling-steps", 2, "--timesteps", 2, "--device", "cpu")
    result = run(*common, "--gates", "hard-concrete", "--out", tmp_path / "hc")
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "hc-uniforget-masks" / "run.json").read_text())["settings"]
    assert settings["gates"] == "hard-concrete" and settings["layers"] == ["ffn"]
    assert not (tmp_path / "hc-uniforget-masks" / NORM_CHANNELS_FILE).exists()
    assert_refused(run(*common, "--gates", "hard-concrete", "--mask-layers", "norm", "--out", tmp_path / "x"),
                   "hard-concrete gates sit on FeedForward neurons only")
