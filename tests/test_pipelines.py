"""Every architecture: FeedForwards found, recorded, located, pruned, saved and reloaded with stock diffusers."""
import hashlib
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.models.attention import BasicTransformerBlock

from memprune.generate import GenerationSettings
from memprune.locate import LocateSettings, locate
from memprune.methods.wanda import SelectionSettings
from memprune.models import find_feedforwards, load_pipeline, output_linears
from memprune.prune import apply_masks, prune_info, save_pruned, undo


def folder_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(folder).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_sd1_feedforwards_found_by_type(saved_pipelines):
    pipe = load_pipeline(str(saved_pipelines["sd1"]))
    names = list(find_feedforwards(pipe.unet))
    # 2 down blocks x 1 layer + 1 mid + 2 up blocks x 2 layers, one transformer block each.
    assert len(names) == 7
    assert "down_blocks.0.attentions.0.transformer_blocks.0.ff" in names
    assert all(linear.in_features == 4 * linear.out_features for linear in output_linears(pipe.unet).values())


@pytest.mark.parametrize("architecture", ["sd1", "sd2", "sdxl"])
def test_locate_prune_save_reload(architecture, saved_pipelines, prompt_file, tmp_path):
    source = saved_pipelines[architecture]
    source_hash = folder_hash(source)
    pipe = load_pipeline(str(source))
    blocks = [m for m in pipe.unet.modules() if isinstance(m, BasicTransformerBlock)]
    assert len(find_feedforwards(pipe.unet)) == len(blocks) > 0
    if architecture == "sdxl":  # transformer_layers_per_block=2 in the second block
        assert any(".transformer_blocks.1.ff" in name for name in find_feedforwards(pipe.unet))

    settings = LocateSettings(
        model=str(source), memorized=str(prompt_file),
        generation=GenerationSettings(steps=3, batch_size=2), selection=SelectionSettings(ratio=0.1),
    )
    result = locate(settings, pipe)
    assert result.masks.steps == [0, 1, 2]
    assert set(result.masks.layers) == set(find_feedforwards(pipe.unet))
    assert sum(result.masks.count().values()) > 0

    before = {name: linear.weight.detach().clone() for name, linear in output_linears(pipe.unet).items()}
    biases = {name: linear.bias.detach().clone() for name, linear in output_linears(pipe.unet).items()}
    other_weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pruned = apply_masks(pipe, result.masks, timesteps=2)
    out = tmp_path / "pruned"
    save_pruned(pipe, out, prune_info(str(source), _save_masks(result.masks, tmp_path), pruned, result.masks))

    reloaded = DiffusionPipeline.from_pretrained(str(out))  # stock diffusers, no memprune involved
    assert type(reloaded).__name__ == type(pipe).__name__
    union = result.masks.union(2)
    state = reloaded.unet.state_dict()
    for name, linear in output_linears(reloaded.unet).items():
        expected = before[name].clone()
        expected[union[name]] = 0
        assert torch.equal(linear.weight, expected), name  # exactly the masked weights are zero, the rest bit-identical
        assert torch.equal(linear.bias, biases[name])
    linears = set(output_linears(reloaded.unet).values())
    output_weight_keys = {f"{name}.weight" for name, module in reloaded.unet.named_modules() if module in linears}
    assert len(output_weight_keys) == len(union)
    for key, value in other_weights.items():
        if key not in output_weight_keys:
            assert torch.equal(state[key], value), key
    assert pruned.total_zeroed == sum(int(m.sum()) for m in union.values())
    assert folder_hash(source) == source_hash  # the source model is untouched

    undo(pipe, pruned)
    for name, linear in output_linears(pipe.unet).items():
        assert torch.equal(linear.weight, before[name])


def _save_masks(masks, tmp_path):
    folder = tmp_path / "masks"
    masks.save(folder)
    return folder
