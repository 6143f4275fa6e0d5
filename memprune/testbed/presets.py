"""Named TestbedConfigs: the shipped recipe and a seconds-long one for tests and smoke runs."""
from __future__ import annotations

from .data import DataConfig
from .model import ModelConfig, UNetConfig
from .train import TestbedConfig


def full() -> TestbedConfig:
    """The recipe of the shipped data/testbed model (see its MODEL_CARD.md)."""
    return TestbedConfig()


def late(start: float, share: float) -> TestbedConfig:
    """Memorized images join only after `start` of the steps, at `share` of each batch from then on."""
    return TestbedConfig(steps=4000, memorized_start=start, memorized_share=share)


def tiny() -> TestbedConfig:
    """A few steps on a few images: exercises every stage, memorizes nothing."""
    return TestbedConfig(
        data=DataConfig(n_memorized=4, n_control=4, max_pool_emoji=16, images_per_general_caption=1),
        model=ModelConfig(unet=UNetConfig(block_out_channels=(32, 64), transformer_layers_per_block=1, attention_head_dim=2)),
        vae_steps=3,
        steps=4,
        batch_size=8,
        warmup_steps=2,
        checkpoint_every_s=0.0,
        keep_snapshots=False,
    )


PRESETS = {"full": full, "tiny": tiny, "late40": lambda: late(0.4, 0.22), "late60": lambda: late(0.6, 0.33)}
