"""memprune prune --method robust-wanda: attack-aware pruning rounds on a tiny pipeline."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from helpers import assert_refused, run
from memprune.errors import MemPruneError
from memprune.masks import Masks
from memprune.methods import get, robust_wanda
from memprune.models import denoiser, prunable_linears
from memprune.similarity import tensor_to_pil

PROMPTS = ["a red circle", "a blue square on white background"]


@pytest.fixture(scope="module")
def located(saved_pipelines, tmp_path_factory):
    """A memorized file with an image column and the Wanda masks folder `memprune locate` writes for it."""
    root = tmp_path_factory.mktemp("robust")
    (root / "images").mkdir()
    rows = ["caption,image"]
    for i, prompt in enumerate(PROMPTS):
        tensor_to_pil(torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i))).save(root / f"images/{i}.png")
        rows.append(f"{prompt},images/{i}.png")
    memorized = root / "memorized.csv"
    memorized.write_text("\n".join(rows) + "\n")
    model = saved_pipelines["sd1"]
    result = run("locate", "--model", model, "--memorized", memorized, "--steps", 2, "--seeds", 1, "--ratio", 0.3,
                 "--device", "cpu", "--out", root / "wanda")
    assert result.exit_code == 0, result.output
    return model, memorized, root / "wanda"


def test_rounds_grow_the_mask_and_stop_at_k(located):
    from diffusers import DiffusionPipeline

    from memprune.conditioning import default_size
    from memprune.similarity import load_image

    model, memorized, wanda = located
    pipe = DiffusionPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    before = {k: v.clone() for k, v in denoiser(pipe).state_dict().items()}
    images = [load_image(memorized.parent / f"images/{i}.png", default_size(pipe)) for i in range(len(PROMPTS))]
    masks = Masks.load(wanda)
    result = robust_wanda.robust_rounds(pipe, robust_wanda.RobustSettings(rounds=3, attack_steps=2, timesteps=2),
                                        masks, PROMPTS, images, progress=False)
    assert len(result.history) == 4 and len(result.rounds) == 4  # round 0 (Wanda) + exactly K rounds
    assert result.rounds["round"].tolist() == [0, 1, 2, 3]
    for earlier, later in zip(result.history, result.history[1:], strict=False):
        assert robust_wanda.contains(later, earlier)
    sizes = [sum(m.union_indices(2)[layer].numel() for layer in m.layers) for m in result.history]
    assert result.rounds.mask_size.tolist() == sizes and sizes == sorted(sizes)
    assert sizes[-1] > sizes[0]  # the attacked embeddings select weights the prompts did not
    assert result.rounds.added_next.iloc[:-1].tolist() == [b - a for a, b in zip(sizes, sizes[1:], strict=False)]
    assert torch.equal(result.masks.indices[next(iter(masks.indices))],
                       result.history[-1].indices[next(iter(masks.indices))])
    after = denoiser(pipe).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # edit leaves the pipeline as given


def test_union_is_a_hand_computed_set_union():
    a = Masks({("l", 0): torch.tensor([0, 3, 5])}, {"l": (2, 4)})
    b = Masks({("l", 0): torch.tensor([1, 3]), ("l", 1): torch.tensor([7])}, {"l": (2, 4)})
    u = robust_wanda.union(a, b)
    assert u.indices[("l", 0)].tolist() == [0, 1, 3, 5] and u.indices[("l", 1)].tolist() == [7]
    assert robust_wanda.contains(u, a) and robust_wanda.contains(u, b) and not robust_wanda.contains(a, u)


@pytest.mark.slow
def test_cli_saves_only_masked_weights_zeroed_and_rounds_csv(located, tmp_path):
    from diffusers import DiffusionPipeline

    model, memorized, wanda = located
    out = tmp_path / "robust"
    result = run("prune", "--model", model, "--method", "robust-wanda", "--masks", wanda, "--rounds", 2,
                 "--attack-steps", 2, "--timesteps", 2, "--memorized", memorized, "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    masks_dir = tmp_path / "robust-robust-wanda-masks"
    rounds = pd.read_csv(masks_dir / "rounds.csv")
    assert len(rounds) == 3 and rounds.mask_size.is_monotonic_increasing
    assert {"copy_similarity_attacked", "attack_objective"} <= set(rounds.columns)
    final = Masks.load(masks_dir)
    original = prunable_linears(denoiser(DiffusionPipeline.from_pretrained(str(model))))
    edited = prunable_linears(denoiser(DiffusionPipeline.from_pretrained(str(out))))
    masked = final.union_indices(2)
    assert sum(idx.numel() for idx in masked.values()) == rounds.mask_size.iloc[-1]
    for name, linear in edited.items():
        w, w0 = linear.weight.detach().flatten(), original[name].weight.detach().flatten()
        changed = (w != w0).nonzero().squeeze(1)
        expected = masked.get(name, torch.empty(0, dtype=torch.long))
        assert torch.equal(changed, expected[w0[expected] != 0])  # exactly the masked weights changed ...
        assert torch.count_nonzero(w[expected]) == 0  # ... to zero


def test_refuses_bad_input(located, tmp_path):
    model, memorized, wanda = located
    base = ("prune", "--model", model, "--method", "robust-wanda", "--device", "cpu")
    assert_refused(run(*base, "--out", tmp_path / "a", "--attack-steps", 1), "give --masks")
    assert_refused(run(*base, "--masks", wanda, "--attack-steps", 0, "--out", tmp_path / "b"),
                   "--attack-steps must be at least 1 with --method robust-wanda")
    no_images = tmp_path / "captions.txt"
    no_images.write_text("\n".join(PROMPTS) + "\n")
    assert_refused(run(*base, "--masks", wanda, "--memorized", no_images, "--out", tmp_path / "c"),
                   "have no training image")
    assert get("robust-wanda", "weight_edit") is robust_wanda
    with pytest.raises(MemPruneError, match="not written by `memprune locate --method wanda`"):
        robust_wanda.LocatedWith.from_masks(Masks({}, {}, {"settings": {}}))
