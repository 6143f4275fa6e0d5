"""Metrics for real models, against hand computations: fixed copy thresholds (memorization_rate@t), the SSCD_Gen
fallback, CLIP score with a tiny config-built CLIP, FID and KID with a tiny TorchScript feature extractor.
Nothing is downloaded."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers import assert_refused, run
from memprune.attack.run import AttackRunSettings, attack_metrics
from memprune.errors import MemPruneError
from memprune.evaluation.fid import (
    Reference,
    feature_statistics,
    fid_kid,
    frechet_distance,
    kernel_inception_distance,
    load_reference,
)
from memprune.evaluation.fixed_thresholds import check_fixed_thresholds, fixed_rates
from memprune.evaluation.run import evaluate
from memprune.evaluation.schema import GROUPS, metric_rank
from memprune.evaluation.settings import EvaluateSettings
from memprune.evaluation.utility import SHIPPED_FID_PROMPTS, fid_prompt_list
from memprune.generate import GenerationSettings, generate
from memprune.models import load_pipeline
from memprune.similarity import ssim
from tiny_pipelines import tiny_tokenizer

GENERATION = GenerationSettings(steps=2, seeds=2, batch_size=4)


# --------------------------------------------------------------------------------------------- fixed thresholds

def test_fixed_threshold_rates_by_hand():
    values = np.array([[0.2, 0.7], [0.71, np.nan], [0.5, 0.9]])
    rates = fixed_rates(values, (0.5, 0.7))
    assert rates == {"memorization_rate@0.5": pytest.approx(3 / 5), "memorization_rate@0.7": pytest.approx(2 / 5)}
    assert fixed_rates(values, (0.7,), "memorization_rate_attacked") == {"memorization_rate_attacked@0.7": 0.4}
    assert check_fixed_thresholds([0.7, 0.5, 0.7], "sscd") == (0.5, 0.7)
    assert check_fixed_thresholds([-0.5], "ssim") == (-0.5,)
    with pytest.raises(MemPruneError, match=r"--fixed-threshold -0.5 is outside the l2 similarity range \[0, 1\]"):
        check_fixed_thresholds([-0.5], "l2")
    assert sorted(["memorization_rate@0.7", "memorization_rate@0.5", "memorization_rate_strict", "copy_similarity"],
                  key=metric_rank) == ["memorization_rate_strict", "memorization_rate@0.5", "memorization_rate@0.7",
                                       "copy_similarity"]


def test_attack_fixed_threshold_rows_by_hand():
    settings = AttackRunSettings(fixed_thresholds=(0.7, 0.5))
    generations = pd.DataFrame({"model": "unedited", "attacked": [False, False, True, True],
                                "copy_similarity": [0.4, 0.8, 0.6, 0.75]})
    per_prompt = pd.DataFrame({"model": ["unedited"], "denoising_loss": [1.0], "denoising_loss_attacked": [0.5],
                               "perturbation_norm_relative": [0.1], "attack_seconds": [2.0]})
    metrics = attack_metrics(per_prompt, generations, settings, 0.9, ["unedited"], "memorized")
    value = dict(zip(metrics.metric, metrics.value, strict=True))
    assert value["memorization_rate"] == 0 and value["memorization_rate_attacked"] == 0  # nothing above 0.9
    assert value["memorization_rate@0.5"] == 0.5 and value["memorization_rate@0.7"] == 0.5
    assert value["memorization_rate_attacked@0.5"] == 1.0 and value["memorization_rate_attacked@0.7"] == 0.5


# --------------------------------------------------------------------------------------------- FID / KID math

def test_frechet_distance_against_eigenvalues():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 4)), rng.normal(0.5, 1.5, size=(50, 4)) @ rng.normal(size=(4, 4))
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    # Tr sqrt(S1 S2) = sum of the square roots of the (real, non-negative) eigenvalues of S1 S2.
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    mu, sigma = feature_statistics(a)
    np.testing.assert_allclose(mu, mu1) and np.testing.assert_allclose(sigma, s1)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-6)
    with pytest.raises(MemPruneError, match="different sizes"):
        frechet_distance(mu1, s1, mu1[:3], s1[:3, :3])


def _mmd_by_loops(x, y):
    d = x.shape[1]
    k = lambda u, v: (u @ v / d + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_against_loops():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(7, 3)), rng.normal(0.3, 1, size=(9, 3))
    # Subsets as large as the smaller set: every subset of x is x itself (in another order).
    mean, std = kernel_inception_distance(x, y[:7], subsets=5, subset_size=100)
    assert mean == pytest.approx(_mmd_by_loops(x, y[:7]), rel=1e-9) and std == pytest.approx(0, abs=1e-12)
    # Random subsets of 4: the mean of the per-subset MMDs, with the same draws as numpy's generator.
    rng_draws = np.random.default_rng(3)
    expected = [_mmd_by_loops(x[rng_draws.choice(7, 4, replace=False)], y[rng_draws.choice(9, 4, replace=False)])
                for _ in range(6)]
    mean, std = kernel_inception_distance(x, y, subsets=6, subset_size=4, seed=3)
    assert mean == pytest.approx(np.mean(expected)) and std == pytest.approx(np.std(expected))


def test_shipped_coco_captions_are_the_default():
    prompts = fid_prompt_list(None, 3)
    assert prompts.prompts[0] == "a person standing close to an elephant" and len(prompts) == 3
    assert (SHIPPED_FID_PROMPTS.parent / "LICENSE").is_file()
    assert len(fid_prompt_list(None, None)) == 10000


def test_reference_statistics_npz(tmp_path):
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(20, 3))
    np.savez(tmp_path / "stats.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    reference = load_reference(tmp_path / "stats.npz", None)
    assert reference.features is None
    values = fid_kid(feats, reference)
    assert set(values) == {"fid"} and values["fid"] == pytest.approx(0, abs=1e-6)
    both = fid_kid(feats, Reference(reference.mu, reference.sigma, feats, "x"), subsets=2, subset_size=5)
    assert set(both) == {"fid", "kid", "kid_std"}
    np.savez(tmp_path / "bad.npz", mean=feats.mean(0))
    with pytest.raises(MemPruneError, match="not an .npz with 'mu' and 'sigma'"):
        load_reference(tmp_path / "bad.npz", None)
    with pytest.raises(MemPruneError, match="does not exist"):
        load_reference(tmp_path / "missing.npz", None)


# --------------------------------------------------------------------------------------------- tiny models

class TinyInception(torch.nn.Module):
    """The FID network's calling convention (images in 0..255, return_features=True) with 3 features."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x / 255.0, 1).flatten(1) + 0.1 * x.std(dim=(2, 3)) / 255.0


def tiny_features(images: torch.Tensor) -> np.ndarray:
    """By hand: the extractor's resize to 299 (bicubic, antialiased) and scaling, then TinyInception."""
    resized = F.interpolate(images, size=(299, 299), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return TinyInception()(resized * 255, True).double().numpy()


def save_tiny_clip(folder):
    from transformers import CLIPConfig, CLIPModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=24, patch_size=8),
        projection_dim=16)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def clip_by_hand(model, tokenizer, images: torch.Tensor, captions: list[str]) -> np.ndarray:
    """100 * max(cos, 0) from CLIPModel's own forward (normalised image_embeds, text_embeds); square images resized
    straight to 24 (= shorter side to 24, nothing cropped), CLIP's mean and std."""
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    pixels = F.interpolate(images, size=(24, 24), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    tokens = tokenizer(captions, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                    pixel_values=(pixels - mean) / std)
    return (100 * (out.image_embeds * out.text_embeds).sum(-1).clamp(min=0)).numpy()


@pytest.fixture(scope="module")
def real_metrics(saved_pipelines, tmp_path_factory):
    """One evaluate with fixed thresholds, CLIP score and FID/KID on a memorized file without images."""
    folder = tmp_path_factory.mktemp("real_metrics")
    model = str(saved_pipelines["sd1"])
    (folder / "memorized.txt").write_text("a red circle\nthe cat\n")
    (folder / "reference.txt").write_text("the green dog\na photo of the dog\n")
    (folder / "fid.txt").write_text("a red square\nthe blue dog\na cat on white\nthe green circle\nnot used\n")
    references = folder / "references"
    references.mkdir()
    rng = np.random.default_rng(0)
    for index in range(5):
        Image.fromarray(rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)).save(references / f"{index}.png")
    torch.jit.script(TinyInception()).save(str(folder / "inception.pt"))
    clip_model, tokenizer = save_tiny_clip(folder / "clip")
    from test_evaluate import write_edited

    edited = write_edited(saved_pipelines["sd1"], folder / "edited", saved_pipelines["sd1"])
    settings = EvaluateSettings(model=model, edited=str(edited), memorized=str(folder / "memorized.txt"),
                                reference=str(folder / "reference.txt"), generation=GENERATION,
                                fixed_thresholds=(0.7, 0.5), clip_model=str(folder / "clip"),
                                fid_reference=str(references), fid_prompts=str(folder / "fid.txt"), fid_count=4,
                                inception=str(folder / "inception.pt"))
    result = evaluate(settings, device="cpu", progress=False)
    return {"folder": folder, "settings": settings, "result": result, "clip": (clip_model, tokenizer),
            "references": references}


def test_fixed_thresholds_and_sscd_gen_fallback_by_hand(real_metrics):
    result = real_metrics["result"]
    assert any("has no image column" in note and "SSCD_Gen" in note for note in result.notes)
    assert set(result.metrics.group) <= set(GROUPS)
    for model in ("edited", "random_control"):
        to_unedited = ssim(result.images[model, "memorized"].flatten(0, 1),
                           result.images["unedited", "memorized"].flatten(0, 1)).numpy()
        for t in (0.5, 0.7):
            expected = np.mean(to_unedited > t)
            assert result.value(model, "memorized", f"memorization_rate@{t:g}") == pytest.approx(expected)
    assert not ((result.metrics.model == "unedited") & result.metrics.metric.str.startswith("memorization_rate")).any()
    assert result.threshold_info["fixed"] == [0.5, 0.7]
    assert {"fid_unedited", "fid_edited", "fid_random_control"} <= set(result.timings)


def test_clip_score_against_the_models_own_embeddings(real_metrics):
    result, (model, tokenizer) = real_metrics["result"], real_metrics["clip"]
    for name in ("unedited", "edited", "random_control"):
        for group, source in (("memorized", "memorized"), ("non_memorized", "reference")):
            images = result.images[name, source]
            captions = [c for c in result.sources[source].prompts for _ in range(images.shape[1])]
            expected = clip_by_hand(model, tokenizer, images.flatten(0, 1), captions).mean()
            assert result.value(name, group, "clip_score") == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_fid_and_kid_against_numpy(real_metrics, saved_pipelines):
    result, references = real_metrics["result"], real_metrics["references"]
    captions = ["a red square", "the blue dog", "a cat on white", "the green circle"]
    reference = np.concatenate([tiny_features(torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), np.float32)
                                                                / 255).permute(2, 0, 1)[None])
                                for p in sorted(references.glob("*.png"))])
    pipe = load_pipeline(str(saved_pipelines["sd1"]))
    images = torch.stack([image for _, _, image in generate(pipe, captions, GenerationSettings(steps=2, seeds=1),
                                                            output_type="pt", progress=False)])
    feats = tiny_features(images.float())
    fid = frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), reference.mean(0),
                           np.cov(reference, rowvar=False))
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvals(np.cov(feats, rowvar=False) @ np.cov(reference, rowvar=False))
                                 .real, 0, None)).sum()
    by_hand = (((feats.mean(0) - reference.mean(0)) ** 2).sum() + np.trace(np.cov(feats, rowvar=False))
               + np.trace(np.cov(reference, rowvar=False)) - 2 * trace_sqrt)
    assert fid == pytest.approx(by_hand, rel=1e-3, abs=1e-6)
    assert result.value("unedited", "fid_prompts", "fid") == pytest.approx(by_hand, rel=1e-3, abs=1e-6)
    assert result.value("unedited", "fid_prompts", "n_generations") == 4
    # Subsets of min(1000, 4, 5) = 4: each subset is all 4 generations against 4 of the 5 references.
    draws = np.random.default_rng(0)
    expected = [_mmd_by_loops(feats[draws.choice(4, 4, replace=False)], reference[draws.choice(5, 4, replace=False)])
                for _ in range(100)]
    assert result.value("unedited", "fid_prompts", "kid") == pytest.approx(np.mean(expected), rel=1e-4, abs=1e-9)
    assert result.value("unedited", "fid_prompts", "kid_std") == pytest.approx(np.std(expected), rel=1e-4, abs=1e-9)
    for name in ("edited", "random_control"):
        assert np.isfinite(result.value(name, "fid_prompts", "fid"))
        assert np.isfinite(result.value(name, "fid_prompts", "clip_score"))
    captions_clip = clip_by_hand(*real_metrics["clip"], images.float(), captions).mean()
    assert result.value("unedited", "fid_prompts", "clip_score") == pytest.approx(captions_clip, rel=1e-4, abs=1e-4)


def test_cli_shows_the_new_metrics(real_metrics):
    folder, settings = real_metrics["folder"], real_metrics["settings"]
    out = folder / "cli"
    result = run("evaluate", "--model", settings.model, "--edited", settings.edited, "--memorized", settings.memorized,
                 "--reference", settings.reference, "--steps", 2, "--seeds", 2, "--device", "cpu",
                 "--fixed-threshold", 0.7, "--fixed-threshold", 0.5, "--clip-model", settings.clip_model,
                 "--fid-reference", settings.fid_reference, "--fid-prompts", settings.fid_prompts, "--fid-count", 4,
                 "--inception", settings.inception, "--grid-prompts", 0, "--out", out)
    assert result.exit_code == 0, result.output
    assert "Fixed copy thresholds 0.5, 0.7" in result.output and "SSCD_Gen" in result.output
    markdown = (out / "metrics.md").read_text()
    for row in ("| memorized | memorization_rate@0.5 |", "| memorized | memorization_rate@0.7 |",
                "| memorized | clip_score |", "| fid_prompts | fid |", "| fid_prompts | kid |"):
        assert row in markdown, row
    metrics = pd.read_csv(out / "metrics.csv")
    merged = metrics.merge(real_metrics["result"].metrics, on=["model", "group", "metric"])
    same = merged[merged.metric.isin(["memorization_rate@0.7", "clip_score", "fid", "kid"])]
    assert len(same) > 10
    np.testing.assert_allclose(same.value_x, same.value_y, rtol=1e-5, atol=1e-8)


def test_bad_metric_inputs(real_metrics, saved_pipelines, tmp_path):
    settings = real_metrics["settings"]
    base = ["evaluate", "--model", settings.model, "--memorized", settings.memorized, "--reference",
            settings.reference, "--steps", 1, "--seeds", 1, "--device", "cpu", "--out", tmp_path / "out"]
    not_torchscript = tmp_path / "inception.pt"
    not_torchscript.write_text("not a model")
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    np.savez(tmp_path / "wide.npz", mu=np.zeros(5), sigma=np.eye(5))
    torch.jit.script(torch.nn.Identity()).save(str(tmp_path / "identity.pt"))
    cases = [
        (["--fixed-threshold", 1.5], "1.5 is not in the range -1<=x<=1"),
        (["--fixed-threshold", "nan"], "'nan' is not a finite number"),
        (["--similarity", "l2", "--fixed-threshold", -0.5], "--fixed-threshold -0.5 is outside the l2 similarity "
                                                            "range [0, 1]."),
        (["--clip-model", tmp_path / "missing"], "is not a folder: give a transformers CLIPModel folder"),
        (["--clip-model", saved_pipelines["sd1"]], "holds no transformers CLIPModel"),
        (["--fid-count", 3], "--fid-count needs --fid-reference"),
        (["--fid-reference", settings.fid_reference], "--fid-reference needs --inception FILE"),
        (["--fid-reference", settings.fid_reference, "--inception", tmp_path / "none.pt"], "does not exist"),
        (["--fid-reference", settings.fid_reference, "--inception", not_torchscript], "is not a TorchScript file"),
        (["--fid-reference", tmp_path / "bad.npz", "--inception", settings.inception], "not an .npz with 'mu'"),
        (["--fid-reference", tmp_path / "wide.npz", "--inception", settings.inception], "holds statistics of 5 "
                                                                                          "features, the Inception"),
        (["--fid-reference", settings.fid_reference, "--inception", tmp_path / "identity.pt"],
         "is not the FID Inception network"),
        (["--fid-reference", settings.fid_reference, "--inception", settings.inception, "--fid-count", 9,
          "--fid-prompts", settings.fid_prompts],
         "--fid-count 9 is more than the 5 captions"),
    ]
    for extra, message in cases:
        assert_refused(run(*base, *extra), message)
    assert not (tmp_path / "out").exists()
