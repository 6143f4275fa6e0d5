"""memprune finetune: the shared loop, gradient projection, DoCo's gradient surgery and the plain control."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from helpers import run
from memprune.errors import MemPruneError
from memprune.finetune import (
    FinetuneSettings,
    apply_delta,
    check_disjoint,
    cross_attention_kv,
    run_finetune,
    trainable_parameters,
)
from memprune.methods import doco, get, gradproj, names, plain
from memprune.retain import generated_retain_data
from tiny_pipelines import sd1_pipeline, sdxl_pipeline

RETAIN = ["a red circle", "a blue square", "the green dog", "a white cat"]
MEMORIZED = ["a photo of the cat", "a blue square on white background"]
TINY = FinetuneSettings(steps=2, batch_size=2, sampling_steps=2, progress=False)


def _state(pipe) -> dict[str, torch.Tensor]:
    """Every tensor of every component, keyed component/name."""
    return {f"{c}/{n}": t.detach().clone() for c, m in pipe.components.items() if isinstance(m, nn.Module)
            for n, t in m.state_dict().items()}


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def tiny(request):
    pipe = {"sd1": sd1_pipeline, "sdxl": sdxl_pipeline}[request.param]()
    pipe.set_progress_bar_config(disable=True)
    return pipe, generated_retain_data(pipe, RETAIN, TINY)


# ------------------------------------------------------------------------------------------ gradient projection


def test_subspace_matches_numpy_svd_and_energy_threshold():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 6)) * np.array([5, 3, 2, 0.5, 0.2, 0.1])  # a few strong directions
    basis, held = gradproj.subspace(torch.from_numpy(x), energy=0.97)
    _, s, vh = np.linalg.svd(x, full_matrices=False)
    cumulative = np.cumsum(s ** 2) / np.sum(s ** 2)
    k = int(np.argmax(cumulative >= 0.97)) + 1
    assert basis.shape == (6, k) and 1 < k < 6
    assert held == pytest.approx(cumulative[k - 1])
    np.testing.assert_allclose(basis.numpy() @ basis.numpy().T, vh[:k].T @ vh[:k], atol=1e-10)
    centred, _ = gradproj.subspace(torch.from_numpy(x + 10.0), energy=0.97, center=True)
    plain_basis, _ = gradproj.subspace(torch.from_numpy(x + 10.0), energy=0.97)
    assert not np.allclose(centred.numpy() @ centred.numpy().T, plain_basis.numpy() @ plain_basis.numpy().T)


def test_projected_gradient_is_hand_computation():
    rng = np.random.default_rng(1)
    grad = rng.normal(size=(5, 6))
    u, _ = np.linalg.qr(rng.normal(size=(6, 2)))
    projected = gradproj.project_off(torch.from_numpy(grad), torch.from_numpy(u)).numpy()
    np.testing.assert_allclose(projected, grad - grad @ u @ u.T, atol=1e-12)
    np.testing.assert_allclose(projected @ u, 0, atol=1e-12)


def _adam_on_linear(project_step: bool, steps: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam on a small nn.Linear (out 5 x d 6) through the gradproj hooks; returns (ΔW, U)."""
    torch.manual_seed(0)
    linear = nn.Linear(6, 5, bias=False)
    vectors = torch.randn(8, 6) @ torch.diag(torch.tensor([4.0, 3.0, 0.1, 0.1, 0.1, 0.1]))
    basis, _ = gradproj.subspace(vectors, energy=0.97)
    assert basis.shape[1] == 2
    hooks = gradproj.GradProjHooks(basis, gradproj.GradProjSettings(project_step=project_step))
    hooks.names = ["w"]
    loop = SimpleNamespace(params={"w": linear.weight}, originals={"w": linear.weight.detach().clone()})
    optimizer = torch.optim.Adam([linear.weight], lr=0.05)
    inputs, targets = torch.randn(32, 6), torch.randn(32, 5)
    for step in range(steps):
        loss = ((linear(inputs) - targets) ** 2).mean()
        grads = {"w": torch.autograd.grad(loss, [linear.weight])[0]}
        hooks.transform_gradients(loop, grads)
        assert torch.allclose(grads["w"] @ basis.float(), torch.zeros(5, 2), atol=1e-6)
        linear.weight.grad = grads["w"]
        optimizer.step()
        with torch.no_grad():
            hooks.after_step(loop, step)
    return (linear.weight.detach() - loop.originals["w"]).double(), basis.double()


def test_projected_update_leaves_memorized_subspace_untouched():
    delta, basis = _adam_on_linear(project_step=True)
    assert delta.norm() > 0.1  # it did learn, outside U
    assert (delta @ basis).norm() / delta.norm() < 1e-6


def test_gradient_projection_alone_leaks_under_adam():
    """Why the step is projected too: Adam's per-coordinate scaling moves a projected gradient back into U."""
    delta, basis = _adam_on_linear(project_step=False)
    assert (delta @ basis).norm() / delta.norm() > 1e-3


# ------------------------------------------------------------------------------------------ DoCo's surgery


def test_surgery_conflicting_pair_is_hand_computation():
    g_u, g_r = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([-1.0, 1.0, 0.0])
    # g_u·g_r = -1 < 0, ‖g_r‖² = 2: g_u - (-1/2) g_r = [0.5, 0.5, 2]
    out = doco.surgery(g_u, g_r)
    assert torch.allclose(out, torch.tensor([0.5, 0.5, 2.0]))
    assert float(out @ g_r) == pytest.approx(0.0, abs=1e-7)
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    b = -b if np.sum(a * b) > 0 else b
    expected = a - np.sum(a * b) / np.sum(b * b) * b
    np.testing.assert_allclose(doco.surgery(torch.from_numpy(a), torch.from_numpy(b)).numpy(), expected, atol=1e-12)


def test_surgery_leaves_non_conflicting_pairs_alone():
    g_u, g_r = torch.tensor([1.0, 1.0]), torch.tensor([1.0, -0.5])  # dot 0.5 > 0
    assert torch.equal(doco.surgery(g_u, g_r), g_u)
    assert torch.equal(doco.surgery(g_u, torch.tensor([1.0, -1.0])), g_u)  # orthogonal: cos = 0, not < 0
    assert torch.equal(doco.surgery(g_u, torch.zeros(2)), g_u)


# ------------------------------------------------------------------------------------------ the shared loop


def test_methods_are_discovered():
    assert {"gradproj", "doco", "plain"} <= set(names("finetune"))
    for name in ("gradproj", "doco", "plain"):
        assert callable(get(name, "finetune").finetune)


@pytest.mark.parametrize("method", ["plain", "gradproj", "doco"])
def test_only_declared_parameters_change_and_pipeline_is_left_unchanged(tiny, method):
    pipe, retain = tiny
    module = get(method, "finetune")
    settings = module.default_settings()
    if method == "doco":
        settings.discriminator_warmup = 0  # the adversarial term runs in 2 steps
        settings.retention = "distill"  # the earlier DoCo port, asked for explicitly (test_doco.py has the default)
    before = _state(pipe)
    kv_settings = FinetuneSettings(**{**TINY.__dict__, "params": "kv"})  # DoCo's default is all of cross-attention
    delta = module.finetune(pipe, kv_settings, method_settings=settings, memorized_prompts=MEMORIZED, retain=retain)
    after_train = _state(pipe)
    assert all(torch.equal(before[k], after_train[k]) for k in before)  # finetune() never edits its input
    kv = {f"unet/{name}.weight" for name in cross_attention_kv(pipe.unet)}
    assert {f"unet/{name}" for name in delta} == kv
    apply_delta(pipe, delta)
    try:
        after = _state(pipe)
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed and changed <= kv
        assert len(changed) >= len(kv) // 2
    finally:
        pipe.unet.load_state_dict({k[len("unet/"):]: v for k, v in before.items() if k.startswith("unet/")})


def test_gradproj_delta_is_orthogonal_to_memorized_subspace_on_a_pipeline(tiny):
    pipe, retain = tiny
    result = gradproj.train(pipe, TINY, memorized_prompts=MEMORIZED, retain=retain)
    basis, _ = gradproj.subspace(gradproj.token_vectors(pipe, MEMORIZED), 0.97)
    for name, change in result.delta.items():
        if change.norm() > 0:
            assert float((change.double() @ basis.double()).norm() / change.double().norm()) < 1e-4, name
    assert result.info["max_relative_residual_dW_U"] < 1e-4
    assert 0 < result.info["subspace_rank"] < result.info["text_dim"]


def test_unet_params_train_everything(tiny):
    pipe, retain = tiny
    settings = FinetuneSettings(steps=1, batch_size=2, sampling_steps=2, progress=False, params="unet")
    delta = plain.finetune(pipe, settings, retain=retain)
    assert set(delta) == set(dict(pipe.unet.named_parameters()))
    assert sum(int(v.abs().sum() > 0) for v in delta.values()) > len(delta) // 2


@pytest.mark.parametrize("method", ["plain", "doco"])
def test_same_seed_same_weights(tiny, method):
    pipe, retain = tiny
    module = get(method, "finetune")
    settings = module.default_settings()
    if method == "doco":
        settings.discriminator_warmup = 0
    runs = [module.finetune(pipe, FinetuneSettings(**{**TINY.__dict__, "seed": seed}), method_settings=settings,
                            memorized_prompts=MEMORIZED, retain=retain) for seed in (0, 0, 1)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_nan_loss_stops_naming_the_step(tiny):
    pipe, retain = tiny
    poisoned = retain.latents.clone()
    poisoned[:] = float("nan")
    bad = type(retain)(poisoned, retain.conditioning, retain.source)
    with pytest.raises(MemPruneError, match="at step 0"):
        run_finetune(pipe, TINY, bad)


def test_params_naming_nothing_and_overlap_are_refused():
    with pytest.raises(MemPruneError, match="names no parameter"):
        trainable_parameters(nn.Sequential(nn.Linear(2, 2)), "kv")
    with pytest.raises(MemPruneError, match="empty"):
        check_disjoint(MEMORIZED, [])
    with pytest.raises(MemPruneError, match="'A photo  of the cat'"):
        check_disjoint(MEMORIZED, ["A photo  of the cat", "a red circle"])


# ------------------------------------------------------------------------------------------ command line


@pytest.fixture
def prompt_files(tmp_path):
    memorized = tmp_path / "memorized.txt"
    memorized.write_text("\n".join(MEMORIZED) + "\n")
    retain = tmp_path / "retain.txt"
    retain.write_text("\n".join(RETAIN) + "\n")
    return memorized, retain


def _cli(model, memorized, retain, out, *extra):
    return run("finetune", "--model", model, "--memorized", memorized, "--retain", retain, "--steps", 2,
               "--batch-size", 2, "--sampling-steps", 2, "--device", "cpu", "--out", out, *extra)


@pytest.mark.slow
@pytest.mark.parametrize("arch,method", [("sd1", "gradproj"), ("sdxl", "doco")])
def test_cli_saves_a_pipeline_stock_diffusers_loads(saved_pipelines, prompt_files, tmp_path, arch, method):
    from diffusers import DiffusionPipeline

    model = saved_pipelines[arch]
    source_files = {p: p.stat().st_mtime_ns for p in model.rglob("*") if p.is_file()}
    out = tmp_path / "tuned"
    result = _cli(model, *prompt_files, out, "--method", method, "--params", "kv")  # DoCo's default is xattn
    assert result.exit_code == 0, result.output
    assert {p: p.stat().st_mtime_ns for p in model.rglob("*") if p.is_file()} == source_files  # source untouched
    info = json.loads((out / "memprune.json").read_text())
    assert info["source"] == str(model) and info["method"] == method and info["steps"] == 2
    assert info["data"]["memorized"]["sha256"] and info["data"]["retain"]["sha256"]
    assert info["changed_parameters"] and all(".to_k." in k or ".to_v." in k for k in info["changed_parameters"])
    tuned = DiffusionPipeline.from_pretrained(str(out))
    original = DiffusionPipeline.from_pretrained(str(model))
    tuned_unet, original_unet = tuned.unet.state_dict(), original.unet.state_dict()
    changed = {k for k in original_unet if not torch.equal(original_unet[k], tuned_unet[k])}
    assert changed == set(info["changed_parameters"])
    for key, value in original.text_encoder.state_dict().items():
        assert torch.equal(value, tuned.text_encoder.state_dict()[key])
    for name, share in info["changed_parameters"].items():
        delta = (tuned_unet[name] - original_unet[name]).double()
        assert share == pytest.approx(float(delta.norm() / original_unet[name].double().norm()), rel=1e-5)
    assert (out / "run.json").is_file() and (out / "loss.csv").is_file()


def test_cli_refuses_bad_input(saved_pipelines, prompt_files, tmp_path):
    model = saved_pipelines["sd1"]
    memorized, retain = prompt_files
    overlapping = tmp_path / "overlap.txt"
    overlapping.write_text("a red circle\na photo of the cat\n")
    result = _cli(model, memorized, overlapping, tmp_path / "o1")
    assert result.exit_code == 1 and "'a photo of the cat'" in result.output and "Traceback" not in result.output
    empty = tmp_path / "empty.csv"
    empty.write_text("caption\n")
    result = _cli(model, memorized, empty, tmp_path / "o2")
    assert result.exit_code == 1 and "holds no prompts" in result.output
    result = _cli(model, memorized, retain, tmp_path / "o3", "--params", "attention")
    assert result.exit_code == 2 and "--params" in result.output
    existing = tmp_path / "exists"
    existing.mkdir()
    result = _cli(model, memorized, retain, existing)
    assert result.exit_code == 1 and "already exists" in result.output
    result = _cli(model, memorized, retain, tmp_path / "o4", "--method", "plain", "--anchors", str(retain))
    assert result.exit_code == 1 and "doco only" in result.output
    assert not any(p.name.startswith((".o", "o1", "o2", "o3", "o4")) for p in tmp_path.iterdir())


@pytest.mark.slow
def test_cli_nan_loss_keeps_nothing(prompt_files, tmp_path):
    pipe = sd1_pipeline()
    with torch.no_grad():
        pipe.unet.conv_in.weight.fill_(float("nan"))
    model = tmp_path / "nan_model"
    pipe.save_pretrained(str(model), safe_serialization=True)
    out = tmp_path / "tuned"
    result = _cli(model, *prompt_files, out, "--method", "plain")
    assert result.exit_code == 1 and "at step 0" in result.output and "Traceback" not in result.output
    assert not out.exists() and not any(p.name.startswith(".tuned") for p in tmp_path.iterdir())


@pytest.mark.parametrize("layout", ["sidecar", "metadata"])
def test_retain_images_are_vae_latents_of_the_pairs(tmp_path, layout):
    from PIL import Image

    from memprune.retain import image_retain_data, read_image_captions

    pipe = sd1_pipeline()
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    rng = np.random.default_rng(3)
    arrays = [rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8) for _ in range(2)]
    for index, (array, caption) in enumerate(zip(arrays, RETAIN, strict=False)):
        Image.fromarray(array).save(tmp_path / f"{index}.png")
        if layout == "sidecar":
            (tmp_path / f"{index}.txt").write_text(caption)
    if layout == "metadata":
        (tmp_path / "metadata.csv").write_text("file_name,caption\n0.png,a red circle\n1.png,a blue square\n")
    assert read_image_captions(tmp_path)[1] == RETAIN[:2]
    data = image_retain_data(pipe, tmp_path, TINY)
    pixels = torch.from_numpy(np.stack(arrays).astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    assert data.source == "images" and data.prompts == RETAIN[:2]
    torch.testing.assert_close(data.latents, expected, atol=1e-5, rtol=1e-5)


def test_retain_images_without_captions_are_refused(tmp_path):
    from PIL import Image

    from memprune.retain import read_image_captions

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(MemPruneError, match="has no caption"):
        read_image_captions(tmp_path)
