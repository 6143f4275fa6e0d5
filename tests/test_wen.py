"""Wen et al.'s inference-time mitigation: the noise norm by hand, it falls, no weight changes, refusals, evaluate."""
import numpy as np
import pandas as pd
import pytest
import torch

from helpers import run
from memprune.detect import generate_with_scores
from memprune.errors import MemPruneError
from memprune.generate import GenerationSettings, default_guidance_scale, generate
from memprune.methods import get
from memprune.methods.wen import WenSettings, first_step_norms, wrap
from tiny_pipelines import BUILDERS

PROMPTS = ["a red circle", "the green dog"]
GENERATION = GenerationSettings(steps=3, seeds=1, batch_size=2)


def state(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value.clone() for name in ("unet", "text_encoder", "text_encoder_2", "vae")
            if getattr(pipe, name, None) is not None for key, value in getattr(pipe, name).state_dict().items()}


def norm_by_hand(pipe, prompt_embeds, negative_embeds, seed, steps, extra=None) -> float:
    """‖ε(x_T, e_p) − ε(x_T, e_∅)‖₂ at the first step, x_T drawn like the pipeline draws it, two separate calls."""
    pipe.scheduler.set_timesteps(steps)
    t = pipe.scheduler.timesteps[0]
    size = pipe.unet.config.sample_size
    x = torch.randn((1, pipe.unet.config.in_channels, size, size), generator=torch.Generator().manual_seed(seed))
    x = pipe.scheduler.scale_model_input(x * pipe.scheduler.init_noise_sigma, t)
    with torch.no_grad():
        cond = pipe.unet(x, t, encoder_hidden_states=prompt_embeds, added_cond_kwargs=(extra or {}).get("cond")).sample
        uncond = pipe.unet(
            x, t, encoder_hidden_states=negative_embeds, added_cond_kwargs=(extra or {}).get("uncond")
        ).sample
    return float(np.linalg.norm((cond - uncond).double().numpy().ravel()))


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_norm_by_hand_and_mitigation_lowers_it(arch):
    pipe = BUILDERS[arch]()
    pipe.set_progress_bar_config(disable=True)
    before = first_step_norms(pipe, PROMPTS, GENERATION.steps, [0], default_guidance_scale(pipe))[:, 0]
    if arch == "sd1":  # the helper's norm equals two separate denoiser calls on the pipeline's own x_T
        cond, uncond = pipe.encode_prompt(PROMPTS[0], "cpu", 1, True)
        assert before[0] == pytest.approx(norm_by_hand(pipe, cond, uncond, 0, GENERATION.steps), rel=1e-4)
    weights = state(pipe)
    target = float(before.min()) * 0.8  # below both prompts: every generation must optimise
    wrapped = wrap(pipe, WenSettings(target=target))
    results = list(generate_with_scores(wrapped, PROMPTS, GENERATION, "pt", progress=False))
    records = wrapped.records
    assert [r.prompt for r in records] == PROMPTS
    np.testing.assert_allclose([r.initial_norm for r in records], before, rtol=1e-4)
    for record, (_, _, image, per_step), initial in zip(records, results, before, strict=True):
        assert 1 <= record.iterations <= 10
        # The recorder sees the pipeline's own first step: with the optimised embedding the norm is lower.
        assert per_step[0] < initial - 1e-3
        assert record.last_norm < initial
        assert torch.isfinite(image).all()
    # Reached-target generations stop at once below the target; the sampling path's first step is that norm.
    for record, (_, _, _, per_step) in zip(records, results, strict=True):
        if record.reached:
            assert record.last_norm <= target and per_step[0] == pytest.approx(record.last_norm, rel=1e-4)
    after = state(pipe)
    assert after.keys() == weights.keys() and all(torch.equal(after[k], weights[k]) for k in weights)
    assert all(p.grad is None for p in pipe.unet.parameters())
    assert all(p.requires_grad for p in pipe.unet.parameters())  # flags restored


def test_target_above_norm_changes_nothing():
    """A target above the prompt's norm: no step, and the images equal the unmitigated pipeline's."""
    pipe = BUILDERS["sd1"]()
    pipe.set_progress_bar_config(disable=True)
    plain = [image for _, _, image in generate(pipe, PROMPTS, GENERATION, output_type="pt", progress=False)]
    wrapped = wrap(pipe, WenSettings(target=1e6))
    mitigated = [image for _, _, image in generate(wrapped, PROMPTS, GENERATION, output_type="pt", progress=False)]
    assert [r.iterations for r in wrapped.records] == [0, 0]
    for a, b in zip(plain, mitigated, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_refusals_and_interface():
    pipe = BUILDERS["sd1"]()
    assert get("wen", "mitigation").METHOD.kind == "mitigation"
    wrapped = wrap(pipe, WenSettings(target=1.0))
    assert default_guidance_scale(wrapped) == default_guidance_scale(pipe) == 7.5  # the pipeline's signature
    assert wrapped.unet is pipe.unet
    with pytest.raises(MemPruneError, match="classifier-free guidance"):
        wrapped(prompt=["a red circle"], num_inference_steps=2, guidance_scale=1.0)
    with pytest.raises(MemPruneError, match="target"):
        wrap(pipe, WenSettings())
    with pytest.raises(MemPruneError, match="--wen-lr"):
        WenSettings(lr=0)
    with pytest.raises(MemPruneError, match="--wen-iterations"):
        WenSettings(max_iterations=0)


def test_nan_embedding_names_the_prompt(monkeypatch):
    import memprune.methods.wen as wen

    real = wen.predict_noise
    monkeypatch.setattr(wen, "predict_noise", lambda *args, **kwargs: real(*args, **kwargs) * float("nan"))
    wrapped = wrap(BUILDERS["sd1"](), WenSettings(target=0.0))
    with pytest.raises(MemPruneError, match="'the green dog'"):
        list(generate(wrapped, ["the green dog"], GENERATION, output_type="latent", progress=False))


@pytest.mark.slow
def test_evaluate_mitigation_column(saved_pipelines, tmp_path):
    """evaluate --mitigation wen: a `wen` column from the same seeds, with its cost ratio and target metrics."""
    (tmp_path / "memorized.txt").write_text("a red circle\nthe cat\n")
    (tmp_path / "reference.txt").write_text("the green dog\na photo of the dog\n")
    out = tmp_path / "out"
    result = run(
        "evaluate", "--model", saved_pipelines["sd1"], "--memorized", tmp_path / "memorized.txt", "--reference",
        tmp_path / "reference.txt", "--steps", 2, "--seeds", 2, "--device", "cpu", "--grid-prompts", 1,
        "--mitigation", "wen", "--wen-iterations", 3, "--out", out)
    assert result.exit_code == 0, result.output
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(dict.fromkeys(metrics.model)) == ["unedited", "wen"]
    value = lambda model, group, metric: metrics.query(  # noqa: E731
        "model == @model and group == @group and metric == @metric").value.iloc[0]
    assert value("wen", "memorized", "seconds_per_image_ratio") > 0
    assert 0 <= value("wen", "memorized", "mitigation_iterations") <= 3
    # The default target (per-prompt mode): the median over the non-memorized prompts of the joint first-step norm of
    # the unedited model over seeds 0 and 1, √(‖d_0‖² + ‖d_1‖²) — the loss's own units.
    from memprune.models import load_pipeline

    pipe = load_pipeline(str(saved_pipelines["sd1"]))
    norms = first_step_norms(pipe, ["the green dog", "a photo of the dog"], 2, [0, 1], 7.5)
    joint = np.sqrt((norms**2).sum(axis=1))
    assert value("wen", "memorized", "mitigation_target") == pytest.approx(np.median(joint), rel=1e-4)
    # Half of the non-memorized prompts lie at or below the median: their images need no step.
    assert value("wen", "non_memorized", "mitigation_target_reached") >= 0.5
    # Generations at or below the target are left alone; the others start sampling from a lower norm.
    for group in ("memorized", "non_memorized"):
        assert (value("wen", group, "detection_score_first_step")
                <= value("unedited", group, "detection_score_first_step") + 1e-6)
    assert value("wen", "non_memorized", "detection_score_first_step") < value("unedited", "non_memorized",
                                                                              "detection_score_first_step")
    assert not metrics.duplicated(["model", "group", "metric"]).any()
    refused = run(
        "evaluate", "--model", saved_pipelines["sd1"], "--memorized", tmp_path / "memorized.txt", "--reference",
        tmp_path / "reference.txt", "--steps", 2, "--seeds", 1, "--guidance-scale", 1.0, "--mitigation", "wen",
        "--out", tmp_path / "nocfg")
    assert refused.exit_code != 0 and "classifier-free guidance" in refused.output
    assert "Traceback" not in refused.output


def _embeddings_per_call(monkeypatch, pipe) -> list[torch.Tensor]:
    """The prompt_embeds of every pipeline call the wrapper makes (spy on the stock pipeline's class call)."""
    import functools

    calls = []
    real = type(pipe).__call__

    @functools.wraps(real)  # keeps the call's signature: memprune reads the default guidance scale from it
    def spy(self, *args, **kwargs):
        if "prompt_embeds" in kwargs:  # the generation, not the encoding calls
            calls.append(kwargs["prompt_embeds"].detach().clone())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", spy)
    return calls


def test_per_prompt_loss_is_the_joint_norm_by_hand():
    """Wen's loss (per-prompt mode, seeds 0-2): √(Σ_s ‖ε_c − ε_u‖²) over the prompt's images, by hand — not the
    per-image norm; every image's record is the prompt's."""
    pipe = BUILDERS["sd1"]()
    pipe.set_progress_bar_config(disable=True)
    seeds = [0, 1, 2]
    cond, uncond = pipe.encode_prompt(PROMPTS[0], "cpu", 1, True)
    per_image = np.array([norm_by_hand(pipe, cond, uncond, seed, 3) for seed in seeds])
    wrapped = wrap(pipe, WenSettings(target=0.0, max_iterations=1), seeds=seeds)
    list(generate(wrapped, [PROMPTS[0]], GenerationSettings(steps=3, seeds=3), output_type="latent", progress=False))
    records = wrapped.records
    assert len(records) == 3 and all(r is records[0] for r in records)  # one optimisation for the prompt
    assert records[0].images == 3 and records[0].iterations == 1
    assert records[0].initial_norm == pytest.approx(np.sqrt((per_image**2).sum()), rel=1e-4)
    assert records[0].initial_norm > per_image.max() * 1.2  # the test tells the joint norm from a per-image one


def test_per_prompt_mode_shares_one_embedding_across_seeds(monkeypatch):
    pipe = BUILDERS["sd1"]()
    pipe.set_progress_bar_config(disable=True)
    original, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    calls = _embeddings_per_call(monkeypatch, pipe)
    settings = GenerationSettings(steps=3, seeds=3, batch_size=2)
    wrapped = wrap(pipe, WenSettings(target=0.0, max_iterations=2), seeds=[0, 1, 2])
    list(generate(wrapped, PROMPTS, settings, output_type="latent", progress=False))
    assert len(calls) == 3  # one call per seed, both prompts in it
    for call in calls[1:]:
        torch.testing.assert_close(call, calls[0], rtol=0, atol=0)  # the same embedding for every seed
    assert not torch.allclose(calls[0], original)  # and it was optimised
    assert not torch.allclose(calls[0][0], calls[0][1])  # one per prompt

    calls.clear()  # per-image mode: each seed's image gets its own embedding
    per_image = wrap(pipe, WenSettings(target=0.0, max_iterations=2, mode="image"))
    list(generate(per_image, PROMPTS, settings, output_type="latent", progress=False))
    assert not torch.allclose(calls[0], calls[1])


def test_per_prompt_mode_refuses_other_seeds():
    wrapped = wrap(BUILDERS["sd1"](), WenSettings(target=0.0, max_iterations=1), seeds=[0, 1])
    with pytest.raises(MemPruneError, match="optimised on seeds"):
        list(generate(wrapped, PROMPTS[:1], GenerationSettings(steps=2, seeds=1, seed=5), output_type="latent",
                      progress=False))
