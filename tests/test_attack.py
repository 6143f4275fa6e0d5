"""memprune attack: the objective and the bound by hand, determinism, no weight change, refusals, the command."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from helpers import run
from memprune.attack.embedding import (
    AttackSettings,
    attack_prompt,
    denoising_loss,
    encode_image,
    generate_from_embeddings,
    noise_draws,
    project,
)
from memprune.attack.run import AttackRunSettings
from memprune.conditioning import default_size, encode
from memprune.errors import MemPruneError
from memprune.generate import GenerationSettings
from memprune.models import DEFAULT_MODEL, output_linears
from memprune.similarity import SSIMBackend, load_image, tensor_to_pil
from tiny_pipelines import BUILDERS

FAST = AttackSettings(attack_steps=12, attack_lr=0.05, bound=1.0, noise_samples=2)


def weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value.clone() for name in ("unet", "text_encoder", "text_encoder_2", "vae")
            if getattr(pipe, name, None) is not None for key, value in getattr(pipe, name).state_dict().items()}


def target_image(pipe) -> torch.Tensor:
    """A target the tiny pipeline can produce: its own generation for another prompt (decoded latent)."""
    other = encode(pipe, ["the green dog"])
    return generate_from_embeddings(pipe, other, other.cond, GenerationSettings(steps=3, seeds=1, seed=7),
                                    default_size(pipe))[0]


def test_project_by_hand():
    delta = torch.tensor([[3.0, 4.0]])  # norm 5
    assert project(delta, 10.0).tolist() == [[3.0, 4.0]]
    np.testing.assert_allclose(project(delta, 1.0).numpy(), [[0.6, 0.8]], rtol=1e-6)


def test_denoising_loss_by_hand():
    """MSE(ε, ε_θ(√ᾱ_t x0 + √(1−ᾱ_t) ε, t, e)) with ᾱ from the scheduler's table, computed with numpy."""
    pipe = BUILDERS["sd1"]()
    conditioning = encode(pipe, ["a red circle"])
    x0 = encode_image(pipe, target_image(pipe))
    (t, noise), = noise_draws(pipe, AttackSettings(attack_steps=0, noise_samples=2), x0.shape[1:])
    with torch.no_grad():
        loss = float(denoising_loss(pipe, x0, conditioning.cond, conditioning, t, noise))
    alpha = pipe.scheduler.alphas_cumprod[t].double().numpy()[:, None, None, None]
    noisy = np.sqrt(alpha) * x0.double().numpy() + np.sqrt(1 - alpha) * noise.double().numpy()
    with torch.no_grad():
        prediction = pipe.unet(
            torch.from_numpy(noisy).float(), t, encoder_hidden_states=conditioning.cond.expand(2, -1, -1)
        ).sample
    assert loss == pytest.approx(float(np.mean((prediction.double().numpy() - noise.double().numpy()) ** 2)), rel=1e-4)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_attack_lowers_objective_respects_bound_changes_no_weight(arch):
    pipe = BUILDERS[arch]()
    pipe.set_progress_bar_config(disable=True)
    image = target_image(pipe)
    before = weights(pipe)
    result = attack_prompt(pipe, "a red circle", image, FAST)
    # The objective on the held-out scoring draw falls, and the optimisation curve goes down.
    assert result.loss_after < result.loss_before
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3])
    # The bound, by hand: ‖δ‖ ≤ bound · ‖e‖ (Frobenius).
    with torch.no_grad():
        embedding = encode(pipe, ["a red circle"]).cond
    assert float(result.delta.norm()) <= FAST.bound * float(embedding.norm()) * (1 + 1e-5)
    assert result.relative_norm == pytest.approx(float(result.delta.norm() / embedding.norm()), rel=1e-5)
    tight = attack_prompt(pipe, "a red circle", image, AttackSettings(attack_steps=3, attack_lr=1.0, bound=0.01))
    assert float(tight.delta.norm()) == pytest.approx(0.01 * float(embedding.norm()), rel=1e-4)  # projection active
    after = weights(pipe)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.grad is None for p in pipe.unet.parameters())
    assert all(p.requires_grad for p in pipe.unet.parameters())


def test_attack_is_deterministic_for_a_seed():
    pipe = BUILDERS["sd1"]()
    image = target_image(pipe)
    first = attack_prompt(pipe, "a red circle", image, FAST)
    again = attack_prompt(pipe, "a red circle", image, FAST)
    assert torch.equal(first.delta, again.delta) and first.losses == again.losses
    other = attack_prompt(pipe, "a red circle", image, AttackSettings(**{**FAST.__dict__, "attack_seed": 1}))
    assert not torch.equal(first.delta, other.delta)
    zero = attack_prompt(pipe, "a red circle", image, AttackSettings(**{**FAST.__dict__, "attack_steps": 0}))
    assert float(zero.delta.abs().max()) == 0 and zero.loss_after == zero.loss_before  # the baseline


def test_nan_names_the_prompt(monkeypatch):
    import memprune.attack.embedding as attack_module

    real = attack_module.predict_noise
    monkeypatch.setattr(attack_module, "predict_noise", lambda *a, **k: real(*a, **k) * float("nan"))
    pipe = BUILDERS["sd1"]()
    with pytest.raises(MemPruneError, match="'a red circle'"):
        attack_prompt(pipe, "a red circle", torch.rand(3, 32, 32), FAST)


def test_settings_refusals():
    for kwargs, message in (({"attack_lr": 0}, "--attack-lr"), ({"bound": -1}, "--bound"),
                            ({"noise_samples": 0}, "--noise-samples"), ({"attack_steps": -1}, "--attack-steps")):
        with pytest.raises(MemPruneError, match=message):
            AttackSettings(**kwargs)
    with pytest.raises(MemPruneError, match="fresh seeds"):
        AttackRunSettings(generation=GenerationSettings(seed=0, seeds=2), attack=AttackSettings(attack_seed=1))
    with pytest.raises(MemPruneError, match="either"):
        AttackRunSettings(threshold=0.5, threshold_from="x")
    # Model names as evaluate gives them.
    assert list(AttackRunSettings(edited=("/a/pruned",)).edited_models()) == ["edited"]
    assert list(AttackRunSettings(edited=("/a/wanda", "/b/nemo")).edited_models()) == ["wanda", "nemo"]


@pytest.mark.slow
def test_attack_raises_similarity_on_the_testbed():
    """On the embedded testbed (a trained pipeline), the attack raises the copy similarity of a memorized prompt's
    fresh-seed generations to its training image over the zero-step baseline."""
    from memprune.models import load_pipeline
    from memprune.prompts import read_prompts

    pipe = load_pipeline(DEFAULT_MODEL)
    memorized = read_prompts(Path(DEFAULT_MODEL) / "captions" / "memorized.csv")
    size = default_size(pipe)
    prompt, image = memorized.prompts[0], load_image(memorized.images[0], size)
    result = attack_prompt(pipe, prompt, image, AttackSettings(attack_steps=25, noise_samples=4))
    assert result.loss_after < result.loss_before
    conditioning = encode(pipe, [prompt])
    generation = GenerationSettings(steps=10, seeds=2, seed=1000)
    backend = SSIMBackend()
    score = lambda cond: float(backend.paired(  # noqa: E731
        generate_from_embeddings(pipe, conditioning, cond, generation, size), image[None].expand(2, -1, -1, -1)).mean())
    assert score(conditioning.cond + result.delta) > score(conditioning.cond)


# --------------------------------------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def attack_inputs(saved_pipelines, tmp_path_factory):
    folder = tmp_path_factory.mktemp("attack")
    model = saved_pipelines["sd1"]
    pipe = StableDiffusionPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    (folder / "images").mkdir()
    tensor_to_pil(target_image(pipe)).save(folder / "images" / "circle.png")
    noise = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    Image.fromarray(noise).save(folder / "images" / "cat.png")
    Image.fromarray(noise[::-1]).save(folder / "images" / "dog.png")
    (folder / "memorized.csv").write_text("caption,image\na red circle,images/circle.png\nthe cat,images/cat.png\n"
                                          "a blue square,\n")
    (folder / "control.csv").write_text("caption,image\nthe green dog,images/dog.png\n")
    (folder / "used.csv").write_text("caption\nthe cat\n")
    edited = {}
    for name, share in (("wanda", 0.3), ("nemo", 0.6)):
        copy = StableDiffusionPipeline.from_pretrained(str(model))
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for linear in output_linears(copy.unet).values():
                linear.weight[torch.rand(linear.weight.shape, generator=generator) < share] = 0
        copy.save_pretrained(str(folder / name), safe_serialization=True)
        (folder / name / "memprune.json").write_text(json.dumps({"source": str(model)}))
        edited[name] = folder / name
    other = StableDiffusionPipeline.from_pretrained(str(model))
    with torch.no_grad():
        next(other.text_encoder.parameters()).add_(0.01)
    other.save_pretrained(str(folder / "other_text"), safe_serialization=True)
    return {"folder": folder, "model": model, "edited": edited}


COMMON = ("--steps", 2, "--seeds", 2, "--attack-steps", 3, "--noise-samples", 1, "--device", "cpu")


@pytest.mark.slow
def test_attack_command(attack_inputs):
    folder, model, edited = attack_inputs["folder"], attack_inputs["model"], attack_inputs["edited"]
    out = folder / "out"
    args = ("attack", "--model", model, "--edited", edited["wanda"], "--edited", edited["nemo"], "--prompts",
            folder / "memorized.csv", "--control", folder / "control.csv", "--exclude-prompts", folder / "used.csv",
            *COMMON, "--out", out)
    result = run(*args)
    assert result.exit_code == 0, result.output
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics.columns) == ["model", "group", "metric", "value"]
    assert list(dict.fromkeys(metrics.model)) == ["unedited", "wanda", "nemo"]  # evaluate's --compare names
    attacked = metrics[metrics.metric.str.endswith("_attacked")]
    # Off a testbed --controls defaults to --control when it has images: the false-positive floor beside the attack.
    assert set(attacked.group) == {"memorized_held_out", "same_style_control"}
    assert set(attacked.metric) == {"memorization_rate_attacked", "copy_similarity_attacked", "denoising_loss_attacked"}
    assert not metrics.duplicated(["model", "group", "metric"]).any() and np.isfinite(metrics.value).all()
    # One prompt attacked: "the cat" was used for locating, "a blue square" has no training image.
    per_prompt = pd.read_csv(out / "per_prompt.csv")
    memorized = per_prompt[per_prompt.group == "memorized_held_out"]
    assert set(memorized.caption) == {"a red circle"} and len(memorized) == 3
    generations = pd.read_csv(out / "generations.csv")
    assert sorted(set(generations.seed)) == [1000, 1001]  # fresh seeds
    # Metrics by hand from the generations: rate strictly above the threshold, similarity means.
    threshold = metrics.query("metric == 'copy_threshold'").value.iloc[0]
    for model_name in ("unedited", "wanda"):
        for attacked_flag, suffix in ((False, ""), (True, "_attacked")):  # noqa: B007 (read by the query)
            rows = generations.query("model == @model_name and attacked == @attacked_flag and "
                                     "group == 'memorized_held_out'")
            value = lambda m, name=model_name: metrics[(metrics.model == name) & (metrics.metric == m)  # noqa: E731
                                                       & (metrics.group == "memorized_held_out")].value.iloc[0]
            assert value(f"memorization_rate{suffix}") == pytest.approx(np.mean(rows.copy_similarity > threshold))
            assert value(f"copy_similarity{suffix}") == pytest.approx(rows.copy_similarity.mean())
    # The threshold: 95th percentile of the control generations' nearest training image (one control prompt, 2 seeds).
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["copy_threshold"]["calibrated_on"] == "same_style_control"
    assert run_info["copy_threshold"]["generations"] == 2
    # The comparison keeps only the attacked metrics of this file.
    from memprune.compare import comparison_metrics

    evaluation = pd.DataFrame([("wanda", "memorized_held_out", "memorization_rate", 0.5)], columns=metrics.columns)
    joined = comparison_metrics(evaluation, metrics)
    assert len(joined.query("metric == 'memorization_rate'")) == 1
    assert len(joined.query("metric == 'memorization_rate_attacked'")) == 6  # 3 models × (held-out, control)
    # Existing output: refused without --overwrite, replaced with it; a given threshold skips calibration.
    again = run(*args)
    assert again.exit_code != 0 and "already exists" in again.output
    given = run(*args[:-2], "--threshold", 0.5, "--out", out, "--overwrite")
    assert given.exit_code == 0, given.output
    assert pd.read_csv(out / "metrics.csv").query("metric == 'copy_threshold'").value.iloc[0] == 0.5
    from_evaluate = folder / "evaluate"
    from_evaluate.mkdir()
    pd.DataFrame([("unedited", "same_style_control", "copy_threshold", 0.25)], columns=metrics.columns).to_csv(
        from_evaluate / "metrics.csv", index=False)
    taken = run(*args[:-2], "--threshold-from", from_evaluate, "--out", out, "--overwrite")
    assert taken.exit_code == 0, taken.output
    assert pd.read_csv(out / "metrics.csv").query("metric == 'copy_threshold'").value.iloc[0] == 0.25


def test_attack_refusals(attack_inputs):
    folder, model = attack_inputs["folder"], attack_inputs["model"]
    base = ("attack", "--model", model, "--prompts", folder / "memorized.csv", "--control", folder / "control.csv",
            *COMMON)
    mismatch = run(*base, "--edited", folder / "other_text", "--out", folder / "refused")
    assert mismatch.exit_code != 0 and "text_encoder weights" in mismatch.output and "Traceback" not in mismatch.output
    assert not (folder / "refused").exists()
    (folder / "no_images.txt").write_text("a red circle\n")
    no_images = run("attack", "--model", model, "--prompts", folder / "no_images.txt", "--threshold", 0.5, *COMMON,
                    "--out", folder / "refused")
    assert no_images.exit_code != 0 and "image column" in no_images.output
    (folder / "foreign.csv").write_text("caption\nsomething else\n")
    foreign = run(*base, "--exclude-prompts", folder / "foreign.csv", "--out", folder / "refused")
    assert foreign.exit_code != 0 and "None of the captions" in foreign.output
    no_threshold = run("attack", "--model", model, "--prompts", folder / "memorized.csv", *COMMON, "--out",
                       folder / "refused")
    assert no_threshold.exit_code != 0 and "--threshold" in no_threshold.output
