"""Evaluate: every metric against a hand computation, the metrics.csv schema, captions with and without ground truth
on a tiny pipeline, the edited-model base check and bad inputs."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from helpers import assert_refused, run
from memprune.commands.evaluate import with_testbed_defaults
from memprune.errors import MemPruneError
from memprune.evaluation.metrics import attribute_accuracy, calibrate_threshold, diversity, memorization_rate
from memprune.evaluation.run import evaluate
from memprune.evaluation.schema import GROUPS, METRICS
from memprune.evaluation.settings import EvaluateSettings
from memprune.generate import GenerationSettings, generate
from memprune.models import load_pipeline, output_linears
from memprune.similarity import (
    L2Backend,
    SSCDBackend,
    SSIMBackend,
    default_ssim_window,
    load_image,
    make_backend,
    normalized_l2_distance,
    sscd_preprocess,
    ssim,
    ssim_matrix,
    tensor_to_pil,
)

# --------------------------------------------------------------------------------------------- metrics by hand


def numpy_ssim(x: np.ndarray, y: np.ndarray, size: int, sigma: float = 1.5) -> float:
    """Reference: loop over every valid window position with the 2-D Gaussian weights; x, y are (C, H, W)."""
    g = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for c in range(x.shape[0]):
        for i in range(x.shape[1] - size + 1):
            for j in range(x.shape[2] - size + 1):
                a, b = x[c, i : i + size, j : j + size], y[c, i : i + size, j : j + size]
                ma, mb = (w * a).sum(), (w * b).sum()
                va, vb = (w * a * a).sum() - ma**2, (w * b * b).sum() - mb**2
                cov = (w * a * b).sum() - ma * mb
                values.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


@pytest.fixture
def images():
    generator = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(3, 3, 36, 36, generator=generator), 5, 1)  # 32×32, structured
    return smooth


def test_ssim_identical_is_one(images):
    assert ssim(images, images).tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    assert ssim(images, images, grayscale=True).tolist() == pytest.approx([1.0] * 3, abs=1e-6)


def test_ssim_against_numpy_reference(images):
    x = images[0]
    for other in (1 - x, torch.roll(x, shifts=(2, 3), dims=(1, 2)), images[1]):
        expected = numpy_ssim(x.double().numpy(), other.double().numpy(), size=11)  # default window at 32 px
        assert float(ssim(x[None], other[None])) == pytest.approx(expected, abs=1e-5)
    assert float(ssim(x[None], 1 - x[None])) < 0  # the inverse is anti-correlated
    large = torch.nn.functional.interpolate(x[None], size=(64, 64), mode="bilinear")
    shifted = torch.roll(large, shifts=4, dims=3)
    assert float(ssim(large, shifted)) == pytest.approx(
        numpy_ssim(large[0].double().numpy(), shifted[0].double().numpy(), 11), abs=1e-5
    )


def test_ssim_of_constant_images_closed_form():
    # Constant images a and b: variances and covariance are 0, so SSIM = (2ab + C1) / (a² + b² + C1).
    a, b = 0.2, 0.7
    x, y = torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b)
    assert float(ssim(x, y)) == pytest.approx((2 * a * b + 1e-4) / (a**2 + b**2 + 1e-4), rel=1e-5)


def test_ssim_matrix_and_window(images):
    matrix = ssim_matrix(images, images[[2, 0]])
    for i in range(3):
        for j, k in enumerate([2, 0]):
            assert float(matrix[i, j]) == pytest.approx(float(ssim(images[i : i + 1], images[k : k + 1])), abs=1e-6)
    assert [default_ssim_window(s, s) for s in (32, 64, 16, 6, 5)] == [11, 11, 7, 5, 5]


def test_normalized_l2_by_hand():
    zeros, half = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.5)
    assert float(normalized_l2_distance(zeros, half)) == pytest.approx(0.5)
    one_pixel = zeros.clone()
    one_pixel[0, 1, 2, 3] = 1.0
    assert float(normalized_l2_distance(zeros, one_pixel)) == pytest.approx((1 / 48) ** 0.5)
    backend = L2Backend()
    assert float(backend.paired(zeros, half)) == pytest.approx(0.5)
    assert backend.matrix(torch.cat([zeros, half]), torch.cat([half, one_pixel])).numpy() == pytest.approx(
        # half vs one_pixel: 47 entries differ by 0.5 and one (1.0 vs 0.5) by 0.5 too: d = 0.5.
        np.array([[0.5, 1 - (1 / 48) ** 0.5], [1.0, 0.5]]), abs=1e-6)


def test_diversity_by_hand(images):
    backend = SSIMBackend()
    same = images[0][None, None].expand(2, 3, -1, -1, -1)  # 2 prompts, 3 identical seeds
    assert diversity(backend, same) == pytest.approx(1.0, abs=1e-6)
    seeds = images[None]  # 1 prompt, 3 different seeds: mean of the three pairs
    pairs = [float(ssim(images[i : i + 1], images[j : j + 1])) for i, j in ((0, 1), (0, 2), (1, 2))]
    assert diversity(backend, seeds) == pytest.approx(np.mean(pairs), abs=1e-6)


def test_threshold_and_memorization_rate_by_hand():
    assert calibrate_threshold(np.arange(101)) == pytest.approx(95.0)
    assert calibrate_threshold([1, 2, 3, 4, np.nan], 50) == pytest.approx(2.5)
    assert memorization_rate([0.1, 0.5, 0.9, 0.95, np.nan], 0.5) == pytest.approx(0.5)  # strictly above
    with pytest.raises(MemPruneError):
        calibrate_threshold([np.nan])


def test_attribute_accuracy_by_hand():
    predicted = [{"colour": "red", "shape": "circle"}, {"color": "Red", "shape": "star"}]
    truth = [{"colour": "red", "shape": "circle", "size": "small"}, {"colour": "blue", "shape": "star"}]
    assert attribute_accuracy(predicted, truth) == pytest.approx(3 / 4)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_sscd_backend_torchscript(tmp_path):
    class SpatialMean(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    path = tmp_path / "sscd.pt"
    torch.jit.script(SpatialMean()).save(str(path))
    backend = make_backend(sscd=path)
    assert isinstance(backend, SSCDBackend) and "TorchScript" in backend.description
    assert sscd_preprocess(torch.rand(2, 3, 32, 48)).shape == (2, 3, 224, 224)
    a = torch.tensor([0.25, 0.75, 1.0]).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    b = torch.tensor([0.75, 0.75, 0.5]).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    # Normalised with mean = std = 0.5, a constant colour c embeds as 2c - 1.
    va, vb = np.array([-0.5, 0.5, 1.0]), np.array([0.5, 0.5, 0.0])
    expected = va @ vb / np.linalg.norm(va) / np.linalg.norm(vb)
    fa, fb = backend.features(a), backend.features(b)
    assert float(backend.paired(fa, fb)) == pytest.approx(expected, abs=1e-5)
    assert float(backend.matrix(fa, fa)) == pytest.approx(1.0, abs=1e-6)


def test_testbed_classifier_adapter(monkeypatch):
    """The testbed's `predict(uint8 N×H×W×3) -> {attribute: names}` is adapted to one dict per image."""
    import types

    import memprune.testbed
    from memprune.evaluation.classifier import load_testbed_classifier

    seen = {}

    class Fake:
        def predict(self, array):
            seen["array"] = array
            return {"colour": np.where(array[..., 0].mean(axis=(1, 2)) > 127, "red", "blue")}

    fake = types.SimpleNamespace(load_classifier=lambda folder: seen.setdefault("folder", folder) and Fake())
    monkeypatch.setattr(memprune.testbed, "attributes", fake, raising=False)
    classify = load_testbed_classifier("/some/testbed")
    red, blue = torch.zeros(3, 4, 4), torch.zeros(3, 4, 4)
    red[0], blue[2] = 1.0, 1.0
    assert classify(torch.stack([red, blue])) == [{"colour": "red"}, {"colour": "blue"}]
    assert seen["folder"] == "/some/testbed"
    assert (
        seen["array"].dtype == np.uint8
        and seen["array"].shape == (2, 4, 4, 3)
        and seen["array"][0, 0, 0].tolist() == [255, 0, 0]
    )


def test_sscd_backend_errors(tmp_path):
    with pytest.raises(MemPruneError, match="does not exist"):
        SSCDBackend(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_text("not a model")
    with pytest.raises(MemPruneError, match="not a TorchScript file"):
        SSCDBackend(bad)
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x00")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        with pytest.raises(MemPruneError, match="needs onnxruntime"):
            SSCDBackend(onnx)
    else:
        with pytest.raises(MemPruneError, match="not a readable ONNX model"):
            SSCDBackend(onnx)


# --------------------------------------------------------------------------------------------- tiny pipelines

GENERATION = GenerationSettings(steps=2, seeds=2, batch_size=4)


def write_edited(source: Path, folder: Path, base: Path, share: float = 0.3) -> Path:
    """A copy of `source` with a share of every FeedForward output weight zeroed, claiming `base` as its source."""
    pipe = StableDiffusionPipeline.from_pretrained(str(source))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for linear in output_linears(pipe.unet).values():
            linear.weight[torch.rand(linear.weight.shape, generator=generator) < share] = 0
    pipe.save_pretrained(str(folder), safe_serialization=True)
    (folder / "memprune.json").write_text(json.dumps({"source": str(base)}))
    return folder


@pytest.fixture(scope="module")
def no_truth(saved_pipelines, tmp_path_factory):
    """Captions with no ground-truth image: only similarity to the unedited generation is measurable."""
    folder = tmp_path_factory.mktemp("evaluate")
    model = saved_pipelines["sd1"]
    (folder / "memorized.txt").write_text("a red circle\nthe cat\na blue square\n")
    (folder / "reference.txt").write_text("the green dog\na photo of the dog\n")
    (folder / "used.csv").write_text("caption\nthe cat\n")
    edited = write_edited(model, folder / "edited", model)
    settings = EvaluateSettings(model=str(model), edited=str(edited), memorized=str(folder / "memorized.txt"),
                                reference=str(folder / "reference.txt"), exclude_prompts=str(folder / "used.csv"),
                                generation=GENERATION)
    result = evaluate(settings, progress=False)
    return {"folder": folder, "model": model, "edited": edited, "settings": settings, "result": result}


def check_schema(metrics: pd.DataFrame):
    assert list(metrics.columns) == ["model", "group", "metric", "value"]
    assert (
        set(metrics.model) <= {"unedited", "edited", "random_control"}
        and set(metrics.group) <= set(GROUPS)
        and set(metrics.metric) <= set(METRICS)
    )
    assert np.isfinite(metrics.value).all()
    assert not metrics.duplicated(["model", "group", "metric"]).any()


def test_no_ground_truth_metrics_by_hand(no_truth, saved_pipelines):
    result = no_truth["result"]
    metrics = result.metrics
    check_schema(metrics)
    assert set(metrics.group) == {"memorized", "memorized_held_out", "non_memorized"}
    assert not (metrics.metric == "copy_similarity").any()  # no training images
    assert set(metrics[metrics.metric == "similarity_to_unedited"].model) == {"edited", "random_control"}
    # undefined for the unedited model
    assert set(metrics[metrics.metric == "memorization_rate"].model) == {"edited", "random_control"}
    assert not (metrics.metric == "memorization_rate_strict").any()  # no training images: no strict threshold

    # The unedited generations are those of a separate generate() call with the same seeds.
    pipe = load_pipeline(str(saved_pipelines["sd1"]))
    again = torch.stack([image for _, _, image in generate(pipe, ["a red circle", "the cat", "a blue square"],
                                                           GENERATION, output_type="pt", progress=False)])
    unedited, edited = result.images["unedited", "memorized"], result.images["edited", "memorized"]
    torch.testing.assert_close(unedited.transpose(0, 1).flatten(0, 1), again)  # generate yields seed-major

    to_unedited = ssim(edited.flatten(0, 1), unedited.flatten(0, 1)).view(3, 2).numpy()
    assert 0 < to_unedited.mean() < 0.999  # the edit changed the images
    assert result.value("edited", "memorized", "similarity_to_unedited") == pytest.approx(to_unedited.mean(), abs=1e-5)
    held_out = [0, 2]  # "the cat" was used for locating
    assert result.value("edited", "memorized_held_out", "similarity_to_unedited") == pytest.approx(
        to_unedited[held_out].mean(), abs=1e-5)
    assert result.value("edited", "memorized_held_out", "n_prompts") == 2

    # Threshold: 95th percentile of the non-memorized unedited generations' nearest unedited memorized generation.
    reference = result.images["unedited", "reference"].flatten(0, 1)
    nearest = ssim_matrix(reference, unedited.flatten(0, 1)).max(dim=1).values.numpy()
    assert result.threshold == pytest.approx(np.percentile(nearest, 95), abs=1e-5)
    assert result.value("unedited", "non_memorized", "copy_threshold") == pytest.approx(result.threshold)
    assert result.threshold_info["mode"] == "unedited_generation"
    assert result.value("edited", "memorized", "memorization_rate") == pytest.approx(
        np.mean(to_unedited > result.threshold)
    )

    pairs = [float(ssim(unedited[p, 0:1], unedited[p, 1:2])) for p in range(3)]
    assert result.value("unedited", "memorized", "diversity") == pytest.approx(np.mean(pairs), abs=1e-5)

    # Detection: per-prompt scores (mean over seeds) and sklearn's AUC, memorized vs non-memorized.
    from sklearn.metrics import roc_auc_score

    table = result.generations[result.generations.model == "unedited"]
    per_prompt = table.groupby(["source", "prompt_index"]).detection_score.mean()
    labels = [1 if source == "memorized" else 0 for source, _ in per_prompt.index]
    assert result.value("unedited", "non_memorized", "detection_auc") == pytest.approx(
        roc_auc_score(labels, per_prompt)
    )
    assert result.value("unedited", "memorized", "detection_score") == pytest.approx(per_prompt["memorized"].mean())
    assert result.value("edited", "memorized", "seconds_per_image") > 0
    ratio = result.value("edited", "memorized", "seconds_per_image") / result.value(
        "unedited", "memorized", "seconds_per_image"
    )
    assert result.value("edited", "memorized", "seconds_per_image_ratio") == pytest.approx(ratio)


def test_evaluate_command_writes_folder(no_truth):
    out = no_truth["folder"] / "cli"
    settings = no_truth["settings"]
    result = run("evaluate", "--model", settings.model, "--edited", settings.edited, "--memorized", settings.memorized,
                 "--reference", settings.reference, "--exclude-prompts", settings.exclude_prompts, "--steps", 2,
                 "--seeds", 2, "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    assert "Similarity backend: SSIM" in result.output and "Copy threshold" in result.output
    for name in ("metrics.csv", "metrics.md", "generations.csv", "run.json", "grids/memorized.png",
                 "grids/non_memorized.png"):
        assert (out / name).is_file(), name
    metrics = pd.read_csv(out / "metrics.csv")
    check_schema(metrics)
    # Same seeds, same images: the CLI's similarities equal the library run's.
    merged = metrics.merge(no_truth["result"].metrics, on=["model", "group", "metric"])
    same = merged[merged.metric.isin(["similarity_to_unedited", "diversity", "copy_threshold", "detection_score"])]
    np.testing.assert_allclose(same.value_x, same.value_y, rtol=1e-5)
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["copy_threshold"]["value"] == pytest.approx(
        metrics.query("metric == 'copy_threshold'").value.iloc[0]
    )
    assert run_info["similarity_backend"].startswith("SSIM")
    markdown = (out / "metrics.md").read_text()
    assert "| group | metric | unedited | edited | random_control |" in markdown
    assert "| memorized | similarity_to_unedited |  |" in markdown
    assert run_info["random_controls"]["random_control"]["seed"] == 0
    with Image.open(out / "grids" / "memorized.png") as grid:
        assert grid.width > 4 * 64 and grid.height >= 3 * 64  # 3 prompts x (2 + 2 seeds), 16 px upscaled to 64


def test_compare_several_edited_models(no_truth, saved_pipelines):
    """--compare: one column per edited folder, each measured against the same unedited generations."""
    folder, settings = no_truth["folder"], no_truth["settings"]
    heavier = write_edited(no_truth["model"], folder / "heavier", no_truth["model"], share=0.6)
    out = folder / "compare"
    result = run("evaluate", "--model", settings.model, "--edited", settings.edited, "--compare", heavier,
                 "--memorized", settings.memorized, "--reference", settings.reference, "--steps", 2, "--seeds", 2,
                 "--device", "cpu", "--grid-prompts", 2, "--no-random-control", "--out", out)
    assert result.exit_code == 0, result.output
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(dict.fromkeys(metrics.model)) == ["unedited", "edited", "heavier"]  # folder names, given order
    assert "| group | metric | unedited | edited | heavier |" in (out / "metrics.md").read_text()
    # The folder named "edited" gives exactly the numbers of the lone --edited run (same seeds, same threshold).
    single = no_truth["result"].metrics
    for metric in ("similarity_to_unedited", "memorization_rate"):  # noqa: B007 (read by the query)
        value = metrics.query("model == 'edited' and group == 'memorized' and metric == @metric").value.iloc[0]
        assert value == pytest.approx(single.query("model == 'edited' and group == 'memorized' and metric == @metric")
                                      .value.iloc[0], abs=1e-5)
    # The heavier prune, by hand: SSIM of its generations to the unedited ones.
    unedited = no_truth["result"].images["unedited", "memorized"]
    pipe = load_pipeline(str(heavier))
    images = torch.stack([image for _, _, image in generate(pipe, ["a red circle", "the cat", "a blue square"],
                                                            GENERATION, output_type="pt", progress=False)])
    by_hand = ssim(images, unedited.transpose(0, 1).flatten(0, 1)).mean().item()
    value = metrics.query(
        "model == 'heavier' and group == 'memorized' and metric == 'similarity_to_unedited'"
    ).value.iloc[0]
    assert value == pytest.approx(by_hand, abs=1e-4)
    assert json.loads((out / "run.json").read_text())["inputs"]["heavier_memprune_json"]["sha256"]


def test_ground_truth_images_with_testbed_defaults(saved_pipelines, tmp_path, monkeypatch):
    """A testbed-like folder (captions/ with training images): default files, the pooled non_memorized group, copy
    similarity to the training image, the threshold from the same-style control and attribute accuracy."""
    import memprune.commands.defaults as defaults_module
    import memprune.commands.evaluate as evaluate_command
    import memprune.evaluation.run as evaluate_module

    model = saved_pipelines["sd1"]
    pipe = load_pipeline(str(model))
    # Training image of "a red circle" = the model's own seed-0 generation: its copy similarity is ~1 (PNG rounding).
    ((_, _, first),) = generate(
        pipe, ["a red circle"], GenerationSettings(steps=2, seeds=1), output_type="pt", progress=False
    )
    images, captions = tmp_path / "images", tmp_path / "captions"
    images.mkdir(), captions.mkdir()
    tensor_to_pil(first).save(images / "circle.png")
    noise = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    for name in ("cat", "dog", "square"):
        Image.fromarray(noise[:, ::-1] if name == "dog" else noise).save(images / f"{name}.png")
    # Image paths relative to the testbed folder, as memprune.testbed.export writes them.
    (captions / "memorized.csv").write_text("caption,image\na red circle,images/circle.png\nthe cat,images/cat.png\n")
    (captions / "non_memorized_same_style.csv").write_text(
        "caption,image\nthe green dog,images/dog.png\na blue square,images/square.png\n")
    (captions / "general_heldout.csv").write_text(
        "caption,image,colour,shape\na red circle,,red,circle\nthe blue square,,blue,square\n"
    )
    monkeypatch.setattr(defaults_module, "testbed_captions", lambda model: captions)
    monkeypatch.setattr(evaluate_module, "load_testbed_classifier",
                        lambda folder, log=None: lambda batch: [{"colour": "red", "shape": "circle"}] * len(batch))
    settings = EvaluateSettings(model=str(model), generation=GENERATION)
    result = evaluate_command.run_evaluation(settings, pipe=pipe, progress=False)
    check_schema(result.metrics)
    assert set(result.metrics.model) == {"unedited"}
    assert set(result.metrics.group) == {"memorized", "non_memorized", "same_style_control", "general"}
    assert result.value("unedited", "non_memorized", "n_prompts") == 4  # pool of control and general
    table = result.generations.set_index(["model", "source", "prompt_index", "seed"])
    copy = table.loc[("unedited", "memorized", 0, 0), "copy_similarity"]
    assert copy > 0.99
    truth = load_image(images / "circle.png")
    assert copy == pytest.approx(float(ssim(result.images["unedited", "memorized"][0, 0][None], truth[None])), abs=1e-6)
    copies = result.generations.query("model == 'unedited' and source == 'memorized'").copy_similarity
    assert result.value("unedited", "memorized", "copy_similarity") == pytest.approx(copies.mean(), abs=1e-6)
    # Threshold on same_style_control: 95th percentile of the nearest of the 4 known training images.
    pool = torch.stack([load_image(images / f"{n}.png") for n in ("circle", "cat", "dog", "square")])
    control = result.images["unedited", "control"].flatten(0, 1)
    assert result.threshold == pytest.approx(
        np.percentile(ssim_matrix(control, pool).max(1).values.numpy(), 95), abs=1e-5
    )
    assert (
        result.threshold_info["calibrated_on"] == "same_style_control"
        and result.threshold_info["mode"] == "training_image"
    )
    assert result.value("unedited", "memorized", "memorization_rate") == pytest.approx(
        np.mean(copies > result.threshold)
    )
    control_copies = result.generations.query("model == 'unedited' and source == 'control'").copy_similarity
    for group in ("same_style_control", "non_memorized"):  # general captions have no training image
        assert result.value("unedited", group, "memorization_rate") == pytest.approx(
            np.mean(control_copies > result.threshold)
        )
    # Strict threshold: 95th percentile of the controls' similarity to their OWN training image (dog.png, square.png).
    own = control_copies.to_numpy()
    by_hand = [float(ssim(result.images["unedited", "control"][i, s][None], load_image(images / f"{n}.png")[None]))
               for i, n in enumerate(("dog", "square")) for s in range(2)]
    np.testing.assert_allclose(np.sort(own), np.sort(by_hand), atol=1e-6)
    strict = np.percentile(by_hand, 95)
    assert result.value("unedited", "same_style_control", "copy_threshold_strict") == pytest.approx(strict, abs=1e-6)
    assert result.threshold_info["strict"]["value"] == pytest.approx(strict, abs=1e-6)
    assert strict <= result.threshold + 1e-9  # own image is one of the pool: never above the nearest
    assert result.value("unedited", "memorized", "memorization_rate_strict") == pytest.approx(np.mean(copies > strict))
    # Attributes: the classifier says (red, circle) for everything: right on prompt 0, wrong on prompt 1.
    assert result.value("unedited", "general", "attribute_accuracy") == pytest.approx(0.5)
    general = result.metrics[result.metrics.group == "general"]
    assert not general.metric.isin(["copy_similarity", "memorization_rate"]).any()
    for group in ("same_style_control", "general", "non_memorized"):
        assert (result.metrics.query(f"group == '{group}'").metric == "detection_auc").any()
    # The folder: a grid with the training image column for the memorized group.
    out = tmp_path / "out"
    monkeypatch.setattr(evaluate_command, "evaluate", lambda settings, **kwargs: result)
    summary = evaluate_command.evaluate_to_folder(settings, out, progress=False)
    assert "Similarity backend: SSIM" in summary
    assert sorted(p.name for p in (out / "grids").iterdir()) == [
        "general.png",
        "memorized.png",
        "same_style_control.png",
    ]
    assert (out / "copy_similarity_ecdf.png").is_file()
    markdown = (out / "metrics.md").read_text()
    assert "(memorization_rate_strict): 95th percentile" in markdown and "(memorization_rate): 95th" in markdown
    with Image.open(out / "grids" / "memorized.png") as grid:
        assert grid.width > 3 * 64  # training image + 2 seeds, 16 px upscaled to 64
        # Row 2 ("the cat"): its training tile is cat.png upscaled 4x by pixel repetition, left of the generations.
        label_w, header_h, row_h = 180, 16, 64 + 12 + 2
        tile = np.asarray(grid.convert("RGB"))[header_h + row_h: header_h + row_h + 64, label_w: label_w + 64]
        np.testing.assert_array_equal(tile, noise.repeat(4, axis=0).repeat(4, axis=1))


def test_testbed_defaults_and_required_files(saved_pipelines, tmp_path):
    captions = tmp_path / "captions"  # any folder with captions/memorized.csv is a testbed (memprune testbed train)
    captions.mkdir()
    (captions / "memorized.csv").write_text("caption\na red circle\n")
    settings = with_testbed_defaults(EvaluateSettings(model=str(tmp_path)))
    assert settings.reference is None
    assert Path(settings.memorized) == captions / "memorized.csv"
    assert Path(settings.control) == captions / "non_memorized_same_style.csv"
    assert Path(settings.general) == captions / "general_heldout.csv"
    twice = with_testbed_defaults(with_testbed_defaults(EvaluateSettings(model=str(tmp_path), general="none")))
    assert twice.prompt_file("general") is None
    with pytest.raises(MemPruneError, match="--reference is required"):
        with_testbed_defaults(EvaluateSettings(model=str(saved_pipelines["sd1"]), memorized="m.txt"))


def test_edited_model_of_another_base_is_refused(no_truth, saved_pipelines, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text((saved_pipelines["sd2"] / "model_index.json").read_text())
    (other / "memprune.json").write_text(json.dumps({"source": str(saved_pipelines["sd2"])}))
    settings = no_truth["settings"]
    result = run("evaluate", "--model", settings.model, "--edited", other, "--memorized", settings.memorized,
                 "--reference", settings.reference, "--out", tmp_path / "o")
    assert_refused(result, "was edited from")
    assert not (tmp_path / "o").exists()


def test_bad_inputs(no_truth, tmp_path):
    s = no_truth["settings"]
    base = ["evaluate", "--model", s.model, "--memorized", s.memorized, "--steps", 2, "--seeds", 2]
    unrelated = tmp_path / "unrelated.csv"
    unrelated.write_text("caption\nsomething else\n")
    missing_image = tmp_path / "missing.csv"
    missing_image.write_text("caption,image\nthe cat,nope.png\n")
    cases = [
        ([], "--reference is required"),
        (["--reference", s.reference, "--exclude-prompts", unrelated], "None of the captions"),
        (["--reference", s.reference, "--seeds", 0], "Invalid value for '--seeds': 0 is not in the range x>=1"),
        (["--reference", missing_image], "does not exist"),
        (["--reference", s.reference, "--sscd", tmp_path / "none.pt"], "SSCD model file"),
        (["--reference", s.reference, "--threshold-percentile", 0], "--threshold-percentile"),
    ]
    for args, message in cases:
        assert_refused(run(*base, *args, "--device", "cpu", "--out", tmp_path / "o"), message)
    existing = tmp_path / "exists"
    existing.mkdir()
    assert_refused(run(*base, "--reference", s.reference, "--out", existing), "already exists")
    assert_refused(
        run(*base, "--reference", s.reference, "--out", Path(s.model) / "eval"), "never writes into a source"
    )
    assert not (tmp_path / "o").exists()


def test_l2_backend_without_guidance(no_truth):
    """--similarity l2 and no classifier-free guidance: no detection rows, similarities from 1 - normalised L2."""
    from dataclasses import replace

    settings = replace(no_truth["settings"], similarity="l2", exclude_prompts=None,
                       generation=replace(GENERATION, guidance_scale=1.0))
    result = evaluate(settings, progress=False)
    check_schema(result.metrics)
    assert not result.metrics.metric.str.startswith("detection").any()
    assert result.backend.startswith("1 - normalised L2")
    unedited, edited = result.images["unedited", "memorized"], result.images["edited", "memorized"]
    distance = normalized_l2_distance(edited.flatten(0, 1), unedited.flatten(0, 1))
    assert result.value("edited", "memorized", "similarity_to_unedited") == pytest.approx(
        float(1 - distance.mean()), abs=1e-5
    )
    assert any("detection metrics are skipped" in note for note in result.notes)
