import numpy as np
import torch
from PIL import Image

from memprune.generate import GenerationSettings
from memprune.locate import LocateSettings, Locator
from memprune.methods.wanda import SelectionSettings
from memprune.models import output_linears
from memprune.prompts import PromptList
from memprune.similarity import make_backend
from memprune.sweep import Scorer, SweepSettings, pruning_sweep, summarize_sweep, zeroed_share


def test_sweep_rows_baseline_and_restored_weights(tmp_path):
    from tiny_pipelines import sd1_pipeline

    pipe = sd1_pipeline()
    pipe.set_progress_bar_config(disable=True)
    generation = GenerationSettings(steps=2, seeds=2, batch_size=4)
    paths = []
    for i in range(2):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((16, 16, 3), 60 * i, dtype=np.uint8)).save(path)
        paths.append(str(path))
    held_out = PromptList(prompts=["a red circle", "the cat"], images=paths)
    scorer = Scorer(held_out=held_out, threshold=-1.0, backend=make_backend("ssim"), generation=generation)
    locator = Locator(pipe, LocateSettings(model="tiny", memorized="unused", generation=generation))
    before = {name: linear.weight.clone() for name, linear in output_linears(pipe.unet).items()}
    settings = SweepSettings(ratios=(0.05, 0.2), timesteps=(1, 2), random_controls=2, generation=generation)
    sweep = pruning_sweep(pipe, lambda ratio: locator.masks(["a dog"], SelectionSettings(ratio=ratio)), scorer,
                          settings, progress=False)
    assert len(sweep) == 1 + 2 * 2 * 3  # baseline + (ratios x taus) x (wanda + 2 random)
    assert (sweep.memorization_rate == 1.0).all()  # threshold -1: every generation counts as a copy
    wanda = sweep[(sweep.method == "wanda")].set_index(["ratio", "timesteps"]).zeroed_share
    random = sweep[(sweep.method == "random")].groupby(["ratio", "timesteps"]).zeroed_share.mean()
    np.testing.assert_allclose(wanda.sort_index().to_numpy(), random.sort_index().to_numpy())  # size-matched
    assert wanda.loc[(0.2, 2)] >= wanda.loc[(0.2, 1)] > wanda.loc[(0.05, 1)]
    masks = locator.masks(["a dog"], SelectionSettings(ratio=0.2))
    assert wanda.loc[(0.2, 2)] == zeroed_share(masks, 2)
    for name, linear in output_linears(pipe.unet).items():
        assert torch.equal(linear.weight, before[name])  # every edit was undone
    assert "memorization_rate (random)" in summarize_sweep(sweep).columns


def test_split_located_is_seeded_and_disjoint():
    from memprune.prompts import seeded_subsets, split_located

    prompts = PromptList(prompts=[f"caption {i}" for i in range(12)], images=[f"{i}.png" for i in range(12)])
    located, held_out = split_located(prompts, 4, seed=3)
    expected = seeded_subsets(12, 1, 4, seed=3)[0]
    assert located.prompts == [f"caption {i}" for i in expected]
    assert held_out.prompts == [f"caption {i}" for i in range(12) if i not in expected]
    assert held_out.images == [f"{i}.png" for i in range(12) if i not in expected]
    assert split_located(prompts, 4, seed=3)[0].prompts == located.prompts


def test_write_prompts_round_trips_through_read_prompts(tmp_path):
    from memprune.prompts import read_prompts, write_prompts

    captions = ["plain", 'a "quoted", comma caption', "face with tears of joy"]
    write_prompts(captions, tmp_path / "prompts_used.csv")
    assert (tmp_path / "prompts_used.csv").read_text().splitlines()[0] == "caption"
    assert read_prompts(tmp_path / "prompts_used.csv").prompts == captions
