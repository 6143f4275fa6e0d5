"""Wen et al.'s detection score: hook vs hand computation on a toy denoiser and vs an independent replay of the
sampling path on a tiny pipeline; labels, ROC summary, and the `memprune detect` command."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor
from sklearn.metrics import roc_auc_score
from torch import nn

from helpers import run
from memprune.detect import NoiseNormRecorder, detection_scores, parse_label, prompt_labels, roc_summary
from memprune.errors import MemPruneError
from memprune.generate import GenerationSettings
from memprune.models import load_pipeline
from memprune.prompts import read_prompts


class ToyDenoiser(nn.Module):
    """ε(x, t, c) = x + t · c₀ (c₀: first entry of the condition), so ε_cond − ε_uncond = t (c₀ − u₀) everywhere."""

    def forward(self, sample, timestep, encoder_hidden_states):
        return (sample + timestep * encoder_hidden_states[:, :1, :1].view(-1, 1, 1, 1),)


def test_noise_norm_on_toy_denoiser():
    toy, x = ToyDenoiser(), torch.randn(2, 4, 3, 5)  # two prompts; C·H·W = 60
    cond = torch.tensor([0.0, 0.0, 2.0, -0.5]).view(4, 1, 1)  # batch [uncond, uncond, cond_a, cond_b]
    with NoiseNormRecorder(toy) as recorder:
        recorder.new_generation(2)
        for t in (3.0, 2.0, 1.0):  # the pipeline calls the denoiser once per step with [uncond, cond]
            toy(torch.cat([x, x]), t, cond)
        scores = recorder.scores()
    expected = torch.tensor([[3 * 2.0, 3 * 0.5], [2 * 2.0, 2 * 0.5], [1 * 2.0, 1 * 0.5]]) * 60**0.5
    torch.testing.assert_close(scores, expected)
    assert scores.mean(0).tolist() == pytest.approx([2 * 2.0 * 60**0.5, 2 * 0.5 * 60**0.5])
    assert not toy._forward_hooks  # removed on exit
    with pytest.raises(MemPruneError, match="classifier-free guidance batch"):
        with NoiseNormRecorder(toy) as recorder:
            recorder.new_generation(2)
            toy(x, 1.0, cond[:2])  # a batch of 2 for 2 prompts: no [uncond, cond] pair


def test_score_matches_replay_of_the_sampling_path(saved_pipelines):
    """The hook reads the pipeline's own denoiser calls; replaying them by hand gives the same norms."""
    pipe = load_pipeline(str(saved_pipelines["sd1"]))
    prompt, steps = "a red circle", 3
    scores = detection_scores(pipe, [prompt], GenerationSettings(steps=steps, seeds=1, seed=5), progress=False)
    latents_after = []
    pipe(prompt, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(5), output_type="latent",
         callback_on_step_end=lambda p, i, t, kw: latents_after.append(kw["latents"].clone()) or kw)
    positive, negative = pipe.encode_prompt(prompt, "cpu", 1, True)
    x = randn_tensor((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(5)) * pipe.scheduler.init_noise_sigma
    pipe.scheduler.set_timesteps(steps)
    norms = []
    with torch.no_grad():
        for i, t in enumerate(pipe.scheduler.timesteps):
            model_input = pipe.scheduler.scale_model_input(x, t)
            uncond = pipe.unet(model_input, t, encoder_hidden_states=negative).sample
            cond = pipe.unet(model_input, t, encoder_hidden_states=positive).sample
            norms.append(float((cond - uncond).norm()))
            x = latents_after[i]
    assert scores.loc[0, "detection_score"] == pytest.approx(np.mean(norms), rel=1e-4)
    assert scores.loc[0, "detection_score_first_step"] == pytest.approx(norms[0], rel=1e-4)
    assert scores.loc[0, "steps_recorded"] == steps


def test_scores_do_not_depend_on_batching(saved_pipelines):
    pipe = load_pipeline(str(saved_pipelines["sd1"]))
    prompts = ["a red circle", "the cat", "a blue square"]
    one = detection_scores(pipe, prompts, GenerationSettings(steps=2, seeds=2, batch_size=1), progress=False)
    three = detection_scores(pipe, prompts, GenerationSettings(steps=2, seeds=2, batch_size=3), progress=False)
    np.testing.assert_allclose(one.detection_score, three.detection_score, rtol=1e-4)
    assert list(one.prompt_index) == [0, 0, 1, 1, 2, 2] and list(one.seed) == [0, 1] * 3


@pytest.mark.parametrize("value, expected", [
    ("VM", 1), ("TM", 1), ("N", 0), ("memorized", 1), ("Non-Memorized", 0), ("non_memorized", 0), ("1", 1), ("0", 0),
    ("true", 1), ("False", 0), ("not memorized", 0),
])
def test_labels(value, expected):
    assert parse_label(value) == expected


def test_bad_label_and_label_columns(tmp_path):
    with pytest.raises(MemPruneError, match="Label 'maybe'"):
        parse_label("maybe")
    path = tmp_path / "p.csv"
    path.write_text("caption,memorized\na red circle,true\nthe cat,false\n")
    labels, raw = prompt_labels(read_prompts(path))
    assert labels.tolist() == [1, 0] and raw == ["true", "false"]
    path.write_text("caption\na red circle\n")
    assert prompt_labels(read_prompts(path)) is None


def test_roc_summary_by_hand():
    # Positives 0.9, 0.4; negatives 0.5, 0.1: 3 of 4 (pos, neg) pairs ordered right; at FPR 0 only 0.9 is found.
    summary = roc_summary([1, 1, 0, 0], [0.9, 0.4, 0.5, 0.1])
    assert summary["auc"] == pytest.approx(0.75) and summary["tpr_at_1pct_fpr"] == pytest.approx(0.5)
    assert summary["positives"] == 2 and summary["negatives"] == 2
    assert roc_summary([1, 1], [0.2, 0.3])["auc"] is None


def test_detect_command_on_labelled_file(saved_pipelines, tmp_path):
    prompts = tmp_path / "labelled.csv"
    prompts.write_text(
        "caption,type\na red circle,VM\nthe cat,TM\na blue square,N\nthe green dog,N\na photo of the dog,N\n"
    )
    out = tmp_path / "scores" / "wen.csv"
    args = ["detect", "--model", saved_pipelines["sd1"], "--prompts", prompts, "--steps", "2", "--seeds", "2",
            "--device", "cpu", "--out", out]
    result = run(*args)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    assert list(table.columns) == ["prompt_index", "caption", "label", "memorized", "detection_score",
                                   "detection_score_first_step", "seeds"]
    assert table.memorized.tolist() == [1, 1, 0, 0, 0] and table.label.tolist() == ["VM", "TM", "N", "N", "N"]
    summary = json.loads(out.with_suffix(".json").read_text())
    auc = roc_auc_score(table.memorized, table.detection_score)
    assert summary["roc"]["detection_score"]["auc"] == pytest.approx(auc)
    assert summary["roc"]["detection_score_first_step"]["auc"] == pytest.approx(
        roc_auc_score(table.memorized, table.detection_score_first_step))
    assert f"ROC AUC {auc:.4f}" in result.output
    assert summary["settings"]["generation"]["steps"] == 2 and "sha256" in summary["inputs"]["prompts"]
    # Scores are the mean over seeds of the library's per-generation scores.
    pipe = load_pipeline(str(saved_pipelines["sd1"]))
    per_generation = detection_scores(
        pipe, table.caption.tolist(), GenerationSettings(steps=2, seeds=2), progress=False
    )
    np.testing.assert_allclose(per_generation.groupby("prompt_index").detection_score.mean(), table.detection_score,
                               rtol=1e-5)
    again = run(*args)
    assert again.exit_code != 0 and "already exists" in again.output


def test_detect_other_architecture_and_unlabelled_file(saved_pipelines, tmp_path):
    prompts = tmp_path / "plain.txt"
    prompts.write_text("a red circle\nthe cat\n")
    out = tmp_path / "sdxl.csv"
    result = run("detect", "--model", saved_pipelines["sdxl"], "--prompts", prompts, "--steps", "2", "--device", "cpu",
                 "--out", out)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    assert "memorized" not in table.columns and (table.detection_score > 0).all()
    assert json.loads(out.with_suffix(".json").read_text())["roc"] == {}


def test_detect_bad_inputs(saved_pipelines, tmp_path):
    model = saved_pipelines["sd1"]
    labelled = tmp_path / "bad.csv"
    labelled.write_text("caption,type\na red circle,VM\nthe cat,maybe\n")
    cases = [
        (["--prompts", labelled, "--out", tmp_path / "a.csv"], "Label 'maybe'"),
        (["--prompts", labelled, "--out", tmp_path / "a.txt"], "must name a .csv file"),
        (["--prompts", tmp_path / "missing.txt", "--out", tmp_path / "a.csv"], "does not exist"),
    ]
    plain = tmp_path / "plain.txt"
    plain.write_text("a red circle\n")
    cases.append((["--prompts", plain, "--guidance-scale", "1", "--steps", "2", "--out", tmp_path / "a.csv"],
                  "needs classifier-free guidance"))
    cases.append((["--prompts", plain, "--out", model / "scores.csv"], "never writes into a source"))
    for args, message in cases:
        result = run("detect", "--model", model, "--device", "cpu", *args)
        assert result.exit_code != 0 and message in result.output, result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "a.csv").exists() and not (model / "scores.csv").exists()
