import math

import numpy as np
import pytest
import torch

from memprune.errors import MemPruneError
from memprune.masks import Masks, iou, subset_overlap
from memprune.methods.wanda import SelectionSettings, neuron_mask, select, wanda_mask
from memprune.stats import NeuronStats


def brute_force_wanda(weight, a_mem, a_ref, ratio):
    """Row by row, sort by score, keep the first k whose a_mem exceeds a_ref (Chavhan et al. 2024)."""
    rows, width = weight.shape
    k = math.floor(ratio * width)
    mask = np.zeros((rows, width), dtype=bool)
    for i in range(rows):
        scores = [abs(weight[i, j]) * a_mem[j] for j in range(width)]
        for j in sorted(range(width), key=lambda j: -scores[j])[:k]:
            mask[i, j] = a_mem[j] > a_ref[j]
    return mask


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.25, 1.0])
def test_wanda_equals_brute_force(ratio):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 40, generator=generator)
    a_mem = torch.rand(40, generator=generator)
    a_ref = torch.rand(40, generator=generator)
    mask = wanda_mask(weight, a_mem, a_ref, ratio)
    expected = brute_force_wanda(weight.numpy(), a_mem.numpy(), a_ref.numpy(), ratio)
    np.testing.assert_array_equal(mask.numpy(), expected)
    if ratio == 1.0:  # every column is in the top k, so the filter alone decides
        np.testing.assert_array_equal(mask.numpy(), np.tile((a_mem > a_ref).numpy(), (6, 1)))


def test_wanda_on_hand_example():
    weight = torch.tensor([[1.0, -4.0, 2.0, 0.5], [3.0, 0.1, 0.2, -5.0]])
    a_mem = torch.tensor([1.0, 1.0, 3.0, 1.0])  # scores row0: 1,4,6,0.5  row1: 3,0.1,0.6,5
    a_ref = torch.tensor([0.0, 2.0, 0.0, 0.0])  # column 1 is no more active than the reference
    mask = wanda_mask(weight, a_mem, a_ref, ratio=0.5)  # k = 2
    assert mask.tolist() == [[False, False, True, False], [True, False, False, True]]


def test_neuron_granularity_picks_whole_columns():
    class Acc:
        def __init__(self, mean, std, norm):
            self.mean, self.std, self.wanda_norm = torch.tensor(mean), torch.tensor(std), torch.tensor(norm)

    memorized = Acc([1.0, 5.0, 0.0, 3.0], [1.0] * 4, [2.0, 1.0, 9.0, 1.0])
    reference = Acc([0.0, 1.0, 1.0, 0.0], [1.0, 2.0, 1.0, 1.0], [1.0, 1.0, 1.0, 2.0])
    weight = torch.ones(3, 4)
    # z = [1, 2, -1, 3] -> top 2 = columns 3 and 1
    assert neuron_mask(weight, memorized, reference, 0.5, "zscore")[0].tolist() == [False, True, False, True]
    # ratio = [2, 1, 9, 0.5] -> top 2 = columns 2 and 0
    mask = neuron_mask(weight, memorized, reference, 0.5, "ratio")
    assert mask[0].tolist() == [True, False, True, False] and mask.all(0).tolist() == mask[0].tolist()


def test_ratio_out_of_range_is_refused():
    for bad in (0, -0.1, 1.5):
        with pytest.raises(MemPruneError, match="--ratio"):
            SelectionSettings(ratio=bad)


def known_masks():
    a = torch.zeros(2, 3, dtype=torch.bool)
    a[0, 0] = a[0, 1] = a[1, 2] = True
    b = torch.zeros(2, 3, dtype=torch.bool)
    b[0, 1] = b[1, 2] = b[1, 0] = b[1, 1] = True
    return a, b


def test_iou_of_known_masks():
    a, b = known_masks()
    assert iou(a, b) == pytest.approx(2 / 5)  # |{01,12}| / |{00,01,12,10,11}|
    assert iou(a, a) == 1.0
    assert math.isnan(iou(torch.zeros(2, 2, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool)))


def test_union_over_steps_and_save_load(tmp_path):
    a, b = known_masks()
    masks = Masks.from_dense({("l", 0): a, ("l", 1): b, ("l", 2): torch.ones(2, 3, dtype=torch.bool)}, meta={"x": 1})
    assert masks.union(2)["l"].tolist() == (a | b).tolist()
    assert masks.union([0])["l"].tolist() == a.tolist()
    with pytest.raises(MemPruneError, match="--timesteps"):
        masks.union(4)
    masks.save(tmp_path)
    loaded = Masks.load(tmp_path)
    assert loaded.meta == {"x": 1} and loaded.steps == [0, 1, 2]
    assert loaded.dense("l", 1).tolist() == b.tolist()


def test_subset_overlap_pairs_and_no_diagonal():
    a, b = known_masks()
    group = lambda *ms: [Masks.from_dense({("l", 0): m}) for m in ms]  # noqa: E731
    overlap = subset_overlap({"memorized": group(a, b, a), "non_memorized": group(b, b)})
    within = overlap[(overlap.group_a == "memorized") & (overlap.group_b == "memorized")]
    assert sorted(zip(within.subset_a, within.subset_b, strict=True)) == [(0, 1), (0, 2), (1, 2)]
    assert within.iou.mean() == pytest.approx((0.4 + 1.0 + 0.4) / 3)
    across = overlap[overlap.group_b != overlap.group_a]
    assert len(across) == 6 and across.iou.mean() == pytest.approx((0.4 * 2 + 1.0 * 2 + 0.4 * 2) / 6)


def test_select_covers_every_layer_and_step():
    memorized, reference = NeuronStats(), NeuronStats()
    for step in range(3):
        memorized.update("l", step, torch.rand(2, 4, 8) + 1)
        reference.update("l", step, torch.rand(2, 4, 8))
    masks = select({"l": torch.randn(5, 8)}, memorized, reference, SelectionSettings(ratio=0.25))
    assert masks.steps == [0, 1, 2] and masks.shapes == {"l": (5, 8)}
    assert all(n <= 5 * 2 for n in masks.count().values())


def test_random_masks_match_union_size_per_layer():
    from memprune.masks import random_masks_like

    a, b = known_masks()
    masks = Masks.from_dense({("l", 0): a, ("l", 1): b, ("m", 0): a, ("m", 1): a})
    random = random_masks_like(masks, timesteps=2, seed=3)
    assert {layer: idx.numel() for layer, idx in random.union_indices(2).items()} == {"l": 5, "m": 3}
    assert torch.equal(random.indices[("l", 0)], random.indices[("l", 1)])
    assert not torch.equal(random_masks_like(masks, 2, seed=4).indices[("l", 0)], random.indices[("l", 0)])


def test_methods_registry_finds_each_method_with_its_entry_point():
    from memprune import methods

    found = methods.available()
    assert {"wanda", "uniforget"} <= set(found)
    assert methods.get("wanda", "weight_edit").edit is found["wanda"].edit
    assert "wanda" in methods.names("weight_edit")
    with pytest.raises(MemPruneError, match="Unknown method 'nope'"):
        methods.get("nope")
    with pytest.raises(MemPruneError, match="not a mitigation"):
        methods.get("wanda", "mitigation")


def test_wanda_edit_selects_from_the_pipeline_weights_and_changes_none():
    from memprune import methods
    from memprune.models import denoiser, output_linears
    from memprune.stats import NeuronStats
    from tiny_pipelines import BUILDERS

    pipe = BUILDERS["sd1"]()
    linears = output_linears(denoiser(pipe))
    before = {name: linear.weight.clone() for name, linear in linears.items()}
    mem, ref = NeuronStats(), NeuronStats()
    torch.manual_seed(0)
    for name, linear in linears.items():
        mem.update(name, 0, torch.randn(2, 3, linear.in_features))
        ref.update(name, 0, 0.1 * torch.randn(2, 3, linear.in_features))
    masks = methods.get("wanda").edit(pipe, SelectionSettings(ratio=0.5), memorized_stats=mem, reference_stats=ref)
    expected = select({n: linear.weight for n, linear in linears.items()}, mem, ref, SelectionSettings(ratio=0.5))
    assert masks.layers == expected.layers
    for key in expected.indices:
        assert torch.equal(masks.indices[key], expected.indices[key])
    assert all(torch.equal(before[n], linear.weight) for n, linear in linears.items())


def test_random_masks_like_saves_and_loads(tmp_path):
    """A random control repeats one index set at every step; it must save (safetensors refuses shared memory)."""
    from memprune.masks import random_masks_like

    dense = {("l", step): torch.rand(4, 6, generator=torch.Generator().manual_seed(step)) > 0.5 for step in range(3)}
    located = Masks.from_dense(dense)
    control = random_masks_like(located, 3, seed=1)
    control.save(tmp_path)
    loaded = Masks.load(tmp_path)
    union = located.union_indices(3)["l"]
    for step in range(3):
        assert loaded.indices[("l", step)].numel() == union.numel()  # the union's size at every step
        assert torch.equal(loaded.indices[("l", step)], control.indices[("l", 0)])
