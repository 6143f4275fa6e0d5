"""UniForget's hard-concrete option (--gates hard-concrete): gates against hand computation, frozen weights, closed
gates -> masks, neutral-only. The default relaxed masks are tested in test_uniforget_relax.py."""
import math

import pandas as pd
import pytest
import torch
from diffusers import DDIMScheduler

from memprune.commands.prune import prune_to_folder
from memprune.commands.uniforget import uniforget_to_folder
from memprune.conditioning import capture_conditioning
from memprune.errors import MemPruneError
from memprune.masks import Masks
from memprune.methods.uniforget import (
    UniForgetSettings,
    sample_trajectory,
    train_gates,
    union_masks,
)
from memprune.methods.uniforget_gates import (
    NeuronGates,
    expected_l0,
    hard_concrete_deterministic,
    hard_concrete_sample,
    uniforget_masks,
)
from memprune.models import denoiser, layer_shapes, output_linears
from memprune.prune import apply_masks
from tiny_pipelines import sd1_pipeline, sdxl_pipeline

NEUTRAL = ["a red circle", "a blue square", "the green dog", "a photo of the cat"]
MEMORIZED = ["a white circle on the background"]
FAST = dict(train_steps=3, sampling_steps=2, batch_size=2, steps=4, progress=False, gates="hard-concrete")


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def _hand_sample(log_alpha, u, beta=2 / 3, gamma=-0.1, zeta=1.1):
    s = _sigmoid((math.log(u) - math.log(1 - u) + log_alpha) / beta)
    return min(1.0, max(0.0, s * (zeta - gamma) + gamma))


def test_hard_concrete_formulas_match_hand_computation():
    log_alpha = torch.tensor([0.0, 3.0, -3.0, 1.0, 2.0], dtype=torch.float64)
    u = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.999], dtype=torch.float64)
    z = hard_concrete_sample(log_alpha, u)
    assert z[0].item() == pytest.approx(0.5)  # sigmoid(0) * 1.2 - 0.1
    assert z[4].item() == 1.0  # stretched past 1, clamped
    for i in range(5):
        assert z[i].item() == pytest.approx(_hand_sample(log_alpha[i].item(), u[i].item()), abs=1e-12)
    assert z[1].item() == pytest.approx(0.823117, abs=1e-6)  # sigmoid((logit(0.1)+3)/(2/3)) * 1.2 - 0.1

    det = hard_concrete_deterministic(log_alpha)
    assert det[1].item() == 1.0 and det[2].item() == 0.0  # 1.2*sigmoid(3)-0.1 = 1.043; 1.2*sigmoid(-3)-0.1 < 0
    assert det[0].item() == pytest.approx(0.5)
    assert det[3].item() == pytest.approx(1.2 * _sigmoid(1.0) - 0.1)

    l0 = expected_l0(log_alpha)
    for i in range(5):
        assert l0[i].item() == pytest.approx(_sigmoid(log_alpha[i].item() - (2 / 3) * math.log(0.1 / 1.1)), abs=1e-12)
    assert l0[0].item() == pytest.approx(0.831822, abs=1e-6)

    # closed exactly below log_alpha = -log(11): the deterministic gate reaches 0 there
    edge = torch.tensor([-math.log(11) - 1e-3, -math.log(11) + 1e-3], dtype=torch.float64)
    assert hard_concrete_deterministic(edge).tolist()[0] == 0.0 and hard_concrete_deterministic(edge)[1] > 0


def test_expected_l0_is_probability_of_open_stochastic_gate():
    generator = torch.Generator().manual_seed(0)
    for value in (-1.0, 0.5, 3.0):
        log_alpha = torch.full((200_000,), value, dtype=torch.float64)
        u = torch.rand(log_alpha.shape, generator=generator, dtype=torch.float64)
        share_open = (hard_concrete_sample(log_alpha, u) > 0).double().mean().item()
        assert share_open == pytest.approx(expected_l0(log_alpha[:1]).item(), abs=0.005)


def test_gate_object_sample_and_pooled_l0():
    gates = NeuronGates({"a": 2, "b": 3}, init_log_alpha=0.0)
    with torch.no_grad():
        gates.log_alpha["b"].fill_(3.0)
    gates.resample(u={"a": torch.tensor([0.5, 0.5]), "b": torch.tensor([0.1, 0.1, 0.1])})
    assert gates.z("a").tolist() == pytest.approx([0.5, 0.5])
    assert gates.z("b").tolist() == pytest.approx([0.823117] * 3, abs=1e-6)
    expected = (2 * _sigmoid(0 + (2 / 3) * math.log(11)) + 3 * _sigmoid(3 + (2 / 3) * math.log(11))) / 5
    assert gates.expected_l0().item() == pytest.approx(expected, rel=1e-6)  # pooled over all 5 gates
    gates.deterministic()
    assert gates.z("b").tolist() == [1.0, 1.0, 1.0]


def test_gates_start_open_and_gated_model_equals_original():
    pipe = sd1_pipeline()
    net = denoiser(pipe)
    gates = NeuronGates.for_denoiser(net)
    assert all(torch.equal(gates.z(n), torch.ones_like(gates.z(n))) for n in gates.layers)

    def run():
        g = torch.Generator().manual_seed(3)
        return pipe(["a red circle"], num_inference_steps=2, output_type="latent", generator=g).images

    original = run()
    with gates.apply(net):
        gated = run()
    assert torch.equal(original, gated)
    # stochastic gates at init: fully open only for u > sigmoid((2/3)*log(11) - 3) ~ 0.198
    gates.resample(torch.Generator().manual_seed(0))
    share_one = torch.cat([(gates.z(n) == 1).float() for n in gates.layers]).mean().item()
    assert share_one == pytest.approx(1 - _sigmoid((2 / 3) * math.log(11) - 3), abs=0.06)
    # hooks are removed on exit, also after an exception; a closed gate changes the output
    linears = output_linears(net)
    with pytest.raises(RuntimeError):
        with gates.apply(net):
            assert all(len(m._forward_pre_hooks) == 1 for m in linears.values())
            raise RuntimeError("boom")
    assert all(len(m._forward_pre_hooks) == 0 for m in linears.values())
    gates.deterministic()
    with torch.no_grad():
        gates.log_alpha[gates.layers[0]].fill_(-10.0)
    with gates.apply(net):
        assert not torch.equal(original, run())


def _weights(pipe):
    return {f"{c}.{k}": v.detach().clone() for c, m in pipe.components.items() if isinstance(m, torch.nn.Module)
            for k, v in m.state_dict().items()}


def test_training_moves_only_the_gates_and_is_deterministic():
    pipe = sd1_pipeline()
    before = _weights(pipe)
    flags = {n: p.requires_grad for n, p in denoiser(pipe).named_parameters()}
    result = train_gates(pipe, NEUTRAL, UniForgetSettings(beta=2.0, **FAST), memorized_prompts=MEMORIZED)
    after = _weights(pipe)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical
    assert flags == {n: p.requires_grad for n, p in denoiser(pipe).named_parameters()}  # restored
    moved = torch.cat([a.detach() for a in result.gates.parameters()])
    assert (moved != 3.0).any()
    assert list(result.history.columns) == ["step", "loss", "mse", "expected_l0", "closed_share"]
    assert len(result.history) == 3 and result.history["loss"].notna().all()
    assert result.history["expected_l0"].iloc[-1] < result.history["expected_l0"].iloc[0]
    again = train_gates(sd1_pipeline(), NEUTRAL, UniForgetSettings(beta=2.0, **FAST), memorized_prompts=MEMORIZED)
    pd.testing.assert_frame_equal(result.history, again.history)
    assert all(torch.equal(a, b) for a, b in zip(result.gates.parameters(), again.gates.parameters(), strict=True))


def test_beta_controls_closing():
    settings = dict(train_steps=12, sampling_steps=2, batch_size=2, steps=2, progress=False, gates="hard-concrete")
    strong = train_gates(sd1_pipeline(), NEUTRAL, UniForgetSettings(beta=5.0, **settings), MEMORIZED)
    none = train_gates(sd1_pipeline(), NEUTRAL, UniForgetSettings(beta=0.0, **settings), MEMORIZED)
    assert strong.pruned_share > 0.1
    assert none.pruned_share < strong.pruned_share
    assert strong.masks.meta["method"] == "uniforget" and strong.masks.meta["beta"] == 5.0
    assert strong.masks.meta["prompts"] == len(NEUTRAL) and strong.masks.meta["lr"] == 0.5
    assert strong.masks.meta["steps"] == 2 and strong.masks.steps == [0, 1]


def test_checkpoint_and_truncated_backprop():
    base = train_gates(sd1_pipeline(), NEUTRAL, UniForgetSettings(**FAST), MEMORIZED)
    checkpointed = train_gates(sd1_pipeline(), NEUTRAL, UniForgetSettings(checkpoint=True, **FAST), MEMORIZED)
    for a, b in zip(base.gates.parameters(), checkpointed.gates.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    truncated = train_gates(sd1_pipeline(), NEUTRAL, UniForgetSettings(backprop_steps=1, **FAST), MEMORIZED)
    assert truncated.history["mse"].iloc[0] == pytest.approx(base.history["mse"].iloc[0])  # same forward
    with pytest.raises(MemPruneError):
        UniForgetSettings(sampling_steps=2, backprop_steps=3)
    # the graph starts at denoiser call grad_from: none when it is past the last call
    pipe = sd1_pipeline()
    net = denoiser(pipe)
    _, conditioning = capture_conditioning(pipe, ["a red circle"], 7.5)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(2)
    gates = NeuronGates.for_denoiser(net, init_log_alpha=0.0)  # gates inside (0, 1): gradients flow
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with gates.apply(net):
        for grad_from, has_graph in ((0, True), (1, True), (2, False)):
            out = sample_trajectory(net, scheduler, latents, conditioning, 7.5, True, grad_from=grad_from)
            assert out.requires_grad == has_graph


def test_mask_prunes_exactly_the_closed_gates():
    pipe = sd1_pipeline()
    net = denoiser(pipe)
    shapes = layer_shapes(net)
    gates = NeuronGates.for_denoiser(net)
    chosen = {gates.layers[0]: [0, 5, 17], gates.layers[2]: [3]}
    with torch.no_grad():
        for layer, columns in chosen.items():
            gates.log_alpha[layer][columns] = -10.0
        gates.log_alpha[gates.layers[1]][7] = -2.0  # deterministic gate 1.2*sigmoid(-2)-0.1 = 0.058 > 0: kept
    masks = uniforget_masks(gates, shapes, steps=5, meta={"method": "uniforget"})
    assert masks.steps == list(range(5)) and masks.layers == list(shapes)
    for layer, (rows, cols) in shapes.items():
        expected = torch.zeros(rows, cols, dtype=torch.bool)
        expected[:, chosen.get(layer, [])] = True
        for step in range(5):
            assert torch.equal(masks.dense(layer, step), expected)
    share = gates.pruned_share().set_index("layer")
    assert share.loc[gates.layers[0], "pruned"] == 3 and share.loc[gates.layers[1], "pruned"] == 0
    assert share.loc[gates.layers[0], "share"] == pytest.approx(3 / shapes[gates.layers[0]][1])

    before = {name: linear.weight.detach().clone() for name, linear in output_linears(net).items()}
    apply_masks(pipe, masks, timesteps=3)
    for name, linear in output_linears(net).items():
        columns = chosen.get(name, [])
        keep = [c for c in range(linear.weight.shape[1]) if c not in columns]
        assert torch.count_nonzero(linear.weight[:, columns]) == 0
        assert torch.equal(linear.weight[:, keep], before[name][:, keep])
    # a threshold keeps more: the 0.058 gate counts as closed at threshold 0.1
    assert gates.closed(0.1)[gates.layers[1]][7]


def test_union_masks_checks_shapes_and_steps(tmp_path):
    shapes = {"a": (2, 3), "b": (1, 2)}
    a = Masks.from_dense({("a", 0): torch.tensor([[1, 0, 0], [0, 0, 0]], dtype=torch.bool),
                          ("b", 0): torch.tensor([[0, 1]], dtype=torch.bool)}, {"method": "uniforget"})
    b = Masks.from_dense({("a", 0): torch.tensor([[1, 1, 0], [0, 0, 1]], dtype=torch.bool),
                          ("b", 0): torch.tensor([[0, 0]], dtype=torch.bool)}, {"selection": {"ratio": 0.01}})
    union = union_masks(a, b)
    assert union.dense("a", 0).tolist() == [[True, True, False], [False, False, True]]
    assert union.dense("b", 0).tolist() == [[False, True]]
    assert union.shapes == shapes
    union.save(tmp_path / "u")
    assert Masks.load(tmp_path / "u").indices[("a", 0)].tolist() == [0, 1, 5]
    other = Masks.from_dense(
        {("a", 0): torch.zeros(2, 4, dtype=torch.bool), ("b", 0): torch.zeros(1, 2, dtype=torch.bool)}
    )
    with pytest.raises(MemPruneError, match="weight shape"):
        union_masks(a, other)
    with pytest.raises(MemPruneError, match="only one"):
        union_masks(a, Masks.from_dense({("a", 0): torch.zeros(2, 3, dtype=torch.bool)}))
    more_steps = Masks.from_dense({**{("a", s): torch.zeros(2, 3, dtype=torch.bool) for s in (0, 1)},
                                   **{("b", s): torch.zeros(1, 2, dtype=torch.bool) for s in (0, 1)}})
    with pytest.raises(MemPruneError, match="steps"):
        union_masks(a, more_steps)


def test_memorized_prompts_in_training_set_raise():
    pipe = sd1_pipeline()
    with pytest.raises(MemPruneError, match="memorized"):
        train_gates(pipe, NEUTRAL + ["  A White circle on the   background "], UniForgetSettings(**FAST), MEMORIZED)
    with pytest.raises(MemPruneError, match="neutral"):
        train_gates(pipe, [], UniForgetSettings(**FAST), MEMORIZED)
    with pytest.warns(UserWarning, match="not checked"):
        train_gates(pipe, NEUTRAL, UniForgetSettings(**{**FAST, "train_steps": 1}))


def test_sdxl_pipeline_trains_and_prunes():
    pipe = sdxl_pipeline()
    before = _weights(pipe)
    result = train_gates(pipe, NEUTRAL, UniForgetSettings(beta=5.0, **{**FAST, "train_steps": 4}), MEMORIZED)
    assert all(torch.equal(v, _weights(pipe)[k]) for k, v in before.items())
    net = denoiser(pipe)
    assert set(result.pruned["layer"]) == set(layer_shapes(net))
    assert result.masks.shapes == {k: tuple(v) for k, v in layer_shapes(net).items()}
    pruned = apply_masks(pipe, result.masks, timesteps=2)
    expected = {row.layer: row.pruned * layer_shapes(net)[row.layer][0] for row in result.pruned.itertuples()}
    assert pruned.zeroed == expected


def test_uniforget_to_folder_then_prune(saved_pipelines, prompt_file, tmp_path):
    neutral = tmp_path / "neutral.txt"
    neutral.write_text("a green circle\na white square\nthe dog on the background\n")
    settings = UniForgetSettings(beta=5.0, train_steps=6, sampling_steps=2, steps=3, progress=False,
                                 gates="hard-concrete")
    out = tmp_path / "uniforget"
    summary = uniforget_to_folder(str(saved_pipelines["sd1"]), str(neutral), out, settings, memorized=str(prompt_file),
                                  device="cpu")
    assert "pruned" in summary and "4 memorized prompts" in summary
    for name in ("masks.safetensors", "masks.json", "gates.safetensors", "loss.csv", "pruned_share.csv", "run.json"):
        assert (out / name).is_file()
    masks = Masks.load(out)
    assert masks.meta["method"] == "uniforget" and masks.steps == [0, 1, 2]
    assert "Zeroed" in prune_to_folder(str(saved_pipelines["sd1"]), out, tmp_path / "pruned", timesteps=3, device="cpu")

    bad = tmp_path / "bad.txt"
    bad.write_text("a green circle\nthe green dog\n")  # 'the green dog' is memorized in prompt_file
    with pytest.raises(MemPruneError, match="memorized"):
        uniforget_to_folder(str(saved_pipelines["sd1"]), str(bad), tmp_path / "x", settings,
                            memorized=str(prompt_file), device="cpu")
    assert not (tmp_path / "x").exists()
    with pytest.raises(MemPruneError, match="neutral"):  # no default neutral prompts off the testbed
        uniforget_to_folder(str(saved_pipelines["sd1"]), None, tmp_path / "y", settings, device="cpu")
