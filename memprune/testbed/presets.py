"""Named TestbedConfigs: the shipped recipe and a seconds-long one for tests and smoke runs."""
from __future__ import annotations

import dataclasses

from .config import TestbedConfig
from .data import DataConfig
from .model import ModelConfig, UNetConfig


def full() -> TestbedConfig:
    """The TestbedConfig defaults: batch 64 x 4000 steps, memorized at 22% after 40% (shipped before late12)."""
    return TestbedConfig()


def v1() -> TestbedConfig:
    """The first shipped recipe: memorized images in every batch from the start at a 12% share, 3800 steps."""
    return TestbedConfig(steps=3800, memorized_start=0.0, memorized_share=0.12)


def late60() -> TestbedConfig:
    """Memorized images only in the last 40% of the steps, at a third of each batch (same views as full)."""
    return TestbedConfig(memorized_start=0.6, memorized_share=0.33)


def late08() -> TestbedConfig:
    """Batch 256 for 2000 steps; memorized images in the second half at 8% of each batch (~410 views).
    Trained on a GPU (scripts/testbed_probes/gpu_variants.py)."""
    return TestbedConfig(batch_size=256, steps=2000, memorized_start=0.5, memorized_share=0.08)


def late12() -> TestbedConfig:
    """Batch 256 for 2000 steps; memorized images in the last 60% at 12% of each batch (~740 views). 77 min on
    2 CPU threads. Shipped 2026-11-26 to 11-27: copies 85% at its threshold (look-alike controls raise it)."""
    return TestbedConfig(batch_size=256, steps=2000, memorized_start=0.4, memorized_share=0.12)


def late11() -> TestbedConfig:
    """late12 trained longer at a slightly smaller share: batch 256 for 2500 steps; memorized images from
    step 800 at 11% of each batch (~960 views). 94 min on 2 CPU threads. Copies more and localizes better
    than late12, but its calibrated copy threshold rises (look-alike control captions): not shipped."""
    return TestbedConfig(batch_size=256, steps=2500, memorized_start=0.32, memorized_share=0.11)


def _on_lookalike_free_data(config: TestbedConfig) -> TestbedConfig:
    """`config` with no two memorized/control emoji, and no pool emoji beside them, above SSIM 0.7."""
    return dataclasses.replace(config, data=dataclasses.replace(config.data, lookalike_ssim=0.7))


def late11d() -> TestbedConfig:
    """late11 on look-alike-free data: no two memorized/control emoji, and no pool emoji beside them, closer
    than SSIM 0.7 (skin-tone variants, clock faces), so "seen once" and "copied" mean what they say.
    Trained (102 min on 2 CPU threads): copies 98% and keeps 88.5% utility, but a ratio-0.1 Wanda mask only
    takes held-out memorization to 77.5% (random: 100%): not shipped."""
    return _on_lookalike_free_data(late11())


def late12d() -> TestbedConfig:
    """The v-prediction testbed shipped as data/testbed until 2026-12-05 (kept as a preset so a zero-terminal-SNR
    v-model stays reachable): late12 (~740 views) on late11d's look-alike-free data. 84 min on 2 CPU threads: copies
    93%, keeps 85.5% utility, and a ratio-0.1 Wanda mask takes held-out memorization to 55% (random: 94%)."""
    return _on_lookalike_free_data(late12())


def late12d_eps() -> TestbedConfig:
    """late12d with Stable Diffusion 1.x's parametrization: epsilon prediction, scaled-linear betas without
    zero-terminal-SNR rescaling, "leading" timestep spacing (steps_offset 1). At t = T with zero terminal SNR the
    v-model's implied noise equals x_T exactly, which makes first-step quantities (NeMo's noise difference, Wen's
    noise norm) degenerate; SD 1.4/1.5, the model every paper here measures, has neither. Shipped as data/testbed
    since 2026-12-05 (70 min on 2 CPU threads, VAE stage cached): at evaluate's strict threshold 97.5% of held-out
    memorized generations copy (55% at its nearest-emoji threshold, which same-style controls resembling pool emoji
    raise), attribute accuracy 89.9%, and a ratio-0.1 Wanda mask takes held-out memorization to 3.8% (random: 57.5%)."""
    config = late12d()
    scheduler = dataclasses.replace(config.model.scheduler, rescale_betas_zero_snr=False, prediction_type="epsilon",
                                    timestep_spacing="leading")
    return dataclasses.replace(config, model=dataclasses.replace(config.model, scheduler=scheduler))


def tiny() -> TestbedConfig:
    """A few steps on a few images: exercises every stage, memorizes nothing."""
    return TestbedConfig(
        data=DataConfig(n_memorized=4, n_control=4, max_pool_emoji=16, images_per_general_caption=1),
        model=ModelConfig(
            unet=UNetConfig(block_out_channels=(32, 64), transformer_layers_per_block=1, attention_head_dim=2)
        ),
        vae_steps=3,
        steps=4,
        batch_size=8,
        warmup_steps=2,
        checkpoint_every_s=0.0,
        keep_snapshots=False,
    )


PRESETS = {"full": full, "tiny": tiny, "v1": v1, "late60": late60, "late08": late08, "late12": late12, "late11": late11,
           "late11d": late11d, "late12d": late12d,
           "late12d_eps": late12d_eps}
