import pandas as pd
import pytest
import torch

from memprune.masks import Masks
from memprune.plots import (
    iou_by_layer,
    iou_heatmap,
    iou_vs_subset_size,
    selected_share_by_layer,
    short_layer_name,
    unet_order,
)

LAYERS = ["down_blocks.0.attentions.0.transformer_blocks.0.ff", "up_blocks.1.attentions.0.transformer_blocks.0.ff",
          "mid_block.attentions.0.transformer_blocks.0.ff"]


def overlap_table():
    rows = []
    for group_a, group_b, value in (("memorized", "memorized", 0.6), ("memorized", "non_memorized", 0.2),
                                    ("non_memorized", "non_memorized", 0.3)):
        for layer in LAYERS:
            for step in range(3):
                rows.append(dict(group_a=group_a, group_b=group_b, subset_a=0, subset_b=1, layer=layer, step=step,
                                 iou=value, subset_size=10))
    return pd.DataFrame(rows)


def test_layer_names_and_unet_order():
    assert short_layer_name(LAYERS[2]) == "mid.a0.t0"
    assert unet_order(LAYERS) == [LAYERS[0], LAYERS[2], LAYERS[1]]


def test_heatmap_values_and_labels():
    fig = iou_heatmap(overlap_table())
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("sampling step") and ax.get_ylabel() == "FeedForward layer"
    assert (ax.images[0].get_array() == 0.6).all()  # only memorized-vs-memorized pairs enter the heatmap
    assert [t.get_text() for t in ax.get_yticklabels()] == ["down0.a0.t0", "mid.a0.t0", "up1.a0.t0"]


def test_lines_include_controls():
    ax = iou_by_layer(overlap_table()).axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(labels) == 3 and any("control" in label for label in labels)
    ax = iou_vs_subset_size(overlap_table()).axes[0]
    assert sorted(line.get_ydata()[0] for line in ax.get_lines()) == [0.2, 0.3, 0.6]


def test_selected_share_by_layer_heights():
    dense = {(LAYERS[0], 0): torch.zeros(4, 5, dtype=torch.bool), (LAYERS[0], 1): torch.zeros(4, 5, dtype=torch.bool)}
    dense[(LAYERS[0], 0)][0, :2] = True
    dense[(LAYERS[0], 1)][1, 1] = True
    ax = selected_share_by_layer(Masks.from_dense(dense), timesteps=2).axes[0]
    assert [p.get_height() for p in ax.patches] == [100 * 3 / 20]


def test_sweep_curves_plot_both_methods_and_baseline():
    from memprune.plots import sweep_curves

    sweep = pd.DataFrame(
        [
            dict(
                method="none",
                ratio=0,
                timesteps=0,
                control_seed=-1,
                zeroed_share=0,
                memorization_rate=0.9,
                attribute_accuracy=0.8,
            ),
            dict(
                method="wanda",
                ratio=0.01,
                timesteps=10,
                control_seed=-1,
                zeroed_share=0.02,
                memorization_rate=0.1,
                attribute_accuracy=0.78,
            ),
            dict(
                method="random",
                ratio=0.01,
                timesteps=10,
                control_seed=0,
                zeroed_share=0.02,
                memorization_rate=0.8,
                attribute_accuracy=0.79,
            ),
            dict(
                method="random",
                ratio=0.01,
                timesteps=10,
                control_seed=1,
                zeroed_share=0.02,
                memorization_rate=0.9,
                attribute_accuracy=0.8,
            ),
        ]
    )
    fig = sweep_curves(sweep)
    assert len(fig.axes) == 2
    lines = {line.get_label(): line.get_ydata() for line in fig.axes[0].get_lines()}
    assert list(lines["random, same size, τ=10"]) == pytest.approx([85.0])  # mean of the two random controls, in %
    assert list(lines["located (Wanda), τ=10"]) == pytest.approx([10.0])
    assert fig.axes[0].get_xlabel().startswith("FeedForward output weights zeroed")
