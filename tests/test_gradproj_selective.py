"""memprune finetune --method gradproj --data --protect: gradient projection while learning data that contains the
images to protect (the paper's selective learning), against the plain arm on the same data."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import assert_refused, run
from memprune.finetune import cross_attention_kv
from memprune.methods import gradproj
from memprune.models import denoiser
from memprune.similarity import tensor_to_pil

LEARNED = ["a red circle", "a blue square", "the green dog", "a white cat"]
PROTECTED = ["a photo of the cat", "socks on a chair"]
COPIES = 3  # each protected image appears this many times in the mixture


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    """A CSV mixture (learned images once, protected images COPIES times) and the protect file."""
    root = tmp_path_factory.mktemp("selective")
    (root / "images").mkdir()
    rows = ["caption,image"]
    for i, caption in enumerate(LEARNED + PROTECTED):
        tensor_to_pil(torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i))).save(root / f"images/{i}.png")
        rows += [f"{caption},images/{i}.png"] * (COPIES if caption in PROTECTED else 1)
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    (root / "protect.txt").write_text("\n".join(PROTECTED) + "\n")
    return root


def _finetune(model, method, mixture, out, *extra):
    return run("finetune", "--model", model, "--method", method, "--data", mixture / "data.csv", "--steps", 6,
               "--lr", 1e-2, "--batch-size", 3, "--device", "cpu", "--out", out, *extra)


def _hand_basis(pipe, captions: list[str], energy: float = 0.97) -> np.ndarray:
    """U by hand: the text encoder's outputs at the caption tokens and EOS (not BOS, not padding), numpy SVD,
    the smallest rank holding `energy` of the squared singular values."""
    tokens = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt")
    with torch.no_grad():
        states = pipe.text_encoder(tokens.input_ids)[0].double().numpy()
    lengths = tokens.attention_mask.sum(dim=1).tolist()
    x = np.concatenate([states[i, 1:n] for i, n in enumerate(lengths)])
    _, s, vh = np.linalg.svd(x, full_matrices=False)
    k = int(np.argmax(np.cumsum(s ** 2) / np.sum(s ** 2) >= energy - 1e-12)) + 1
    return vh[:k].T


def _kv_deltas(model, out) -> dict[str, np.ndarray]:
    from diffusers import DiffusionPipeline

    before = denoiser(DiffusionPipeline.from_pretrained(str(model)))
    after = denoiser(DiffusionPipeline.from_pretrained(str(out)))
    kv_after = cross_attention_kv(after)
    return {name: (kv_after[name].weight.detach().double() - linear.weight.detach().double()).numpy()
            for name, linear in cross_attention_kv(before).items()}


@pytest.mark.slow
def test_projected_update_is_orthogonal_to_the_protected_subspace_and_plain_is_not(saved_pipelines, mixture,
                                                                                     tmp_path):
    from diffusers import DiffusionPipeline

    model = saved_pipelines["sd1"]
    result = _finetune(model, "gradproj", mixture, tmp_path / "projected", "--protect", mixture / "protect.txt")
    assert result.exit_code == 0, result.output
    assert f"{len(PROTECTED) * COPIES} of the {len(LEARNED) + len(PROTECTED) * COPIES} --data rows" in result.output
    unrelated = tmp_path / "memorized.txt"  # plain needs memorized captions (checked disjoint from the data)
    unrelated.write_text("a caption of nothing here\n")
    result = _finetune(model, "plain", mixture, tmp_path / "plain", "--memorized", unrelated)
    assert result.exit_code == 0, result.output
    basis = _hand_basis(DiffusionPipeline.from_pretrained(str(model)), PROTECTED)
    info = json.loads((tmp_path / "projected" / "memprune.json").read_text())
    assert info["method_info"]["subspace_rank"] == basis.shape[1] < basis.shape[0]
    assert info["data"]["retain_source"] == "images" and info["data"]["retain_count"] == 10
    projected, plain = _kv_deltas(model, tmp_path / "projected"), _kv_deltas(model, tmp_path / "plain")
    for name, change in projected.items():
        assert np.linalg.norm(change) > 0, name  # it learned something ...
        assert np.linalg.norm(change @ basis) / np.linalg.norm(change) < 1e-5, name  # ... nothing along U
    leak = np.sqrt(sum(np.linalg.norm(d @ basis) ** 2 for d in plain.values()))
    assert leak / np.sqrt(sum(np.linalg.norm(d) ** 2 for d in plain.values())) > 0.1


def test_check_protected_says_which_captions():
    with pytest.raises(gradproj.MemPruneError, match="1 retain captions are also --protect captions \\('socks'\\)"):
        gradproj.check_protected(["Socks"], ["a cat", "socks"], from_data=False)
    with pytest.raises(gradproj.MemPruneError, match="Every caption of --data is a --protect caption"):
        gradproj.check_protected(["socks"], ["socks", "Socks"], from_data=True)
    assert "no caption of --data" in gradproj.check_protected(["socks"], ["a cat"], from_data=True)[0]
    assert gradproj.check_protected(["socks"], ["a cat"], from_data=False) == []


def test_bad_input_is_refused_and_nothing_is_kept(saved_pipelines, mixture, tmp_path, monkeypatch):
    model = saved_pipelines["sd1"]
    protect = mixture / "protect.txt"
    retain = tmp_path / "retain.txt"
    retain.write_text("a red circle\nsocks on a chair\n")
    assert_refused(run("finetune", "--model", model, "--retain", retain, "--protect", protect, "--steps", 1,
                       "--device", "cpu", "--out", tmp_path / "a"), "'socks on a chair'")
    assert_refused(_finetune(model, "plain", mixture, tmp_path / "b", "--protect", protect),
                   "--protect is used by --method gradproj only")
    assert_refused(_finetune(model, "gradproj", mixture, tmp_path / "c", "--protect", protect, "--memorized", protect),
                   "Give --protect")
    broken = mixture / "broken.csv"
    broken.write_text("caption,image\na red circle,images/0.png\nsocks,images/missing.png\n")
    assert_refused(run("finetune", "--model", model, "--data", broken, "--protect", protect, "--device", "cpu",
                       "--out", tmp_path / "d"), "names image")
    assert_refused(_finetune(model, "gradproj", mixture, tmp_path / "e", "--protect", protect, "--retain", retain),
                   "Give --data")
    from memprune.finetune import FinetuneLoop

    monkeypatch.setattr(FinetuneLoop, "retain_loss", lambda self, kind: torch.tensor(float("nan")))
    assert_refused(_finetune(model, "gradproj", mixture, tmp_path / "f", "--protect", protect),
                   "loss became nan at step 0: nothing was saved")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["retain.txt"]
