"""The testbed's training recipe (TestbedConfig) and its JSON form.

Its own module so that presets, the exported model card and the trainer can all name it without importing
each other.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .data import DataConfig
from .model import ModelConfig, SchedulerConfig, TextConfig, UNetConfig, VAEConfig


@dataclass
class TestbedConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # Stage 1: VAE (short; its reconstruction quality is the ceiling for any copy).
    vae_steps: int = 2000
    vae_batch_size: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    vae_decode_mean: bool = True
    # Stage 2: UNet.
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup_steps: int = 200
    # Cosine decay to `final_lr_fraction` over the last part of training: memorization sharpens there.
    decay_fraction: float = 0.3
    final_lr_fraction: float = 0.05
    # LAION-like mixture: memorized images are a small share of samples but each seen hundreds
    # of times; the pool emoji a few times each; the control emoji once each; the rest shapes.
    memorized_share: float = 0.22  # of each batch once memorized images are in (from memorized_start on)
    # Fraction of the UNet steps before the memorized images join the mixture. Stable Diffusion 1.x
    # met its heavily duplicated images mostly in later, curated stages (LAION-aesthetics); a late
    # start makes memorization an addition to a model that already renders the general data.
    memorized_start: float = 0.4
    pool_share: float = 0.20
    empty_caption_prob: float = 0.10  # for classifier-free guidance
    checkpoint_every_s: float = 300.0
    keep_snapshots: bool = True  # UNet weights at every checkpoint, to follow memorization
    threads: int = 1

    @property
    def first_memorized_step(self) -> int:
        return int(round(self.steps * self.memorized_start))

    @property
    def views_per_memorized(self) -> float:
        steps = self.steps - self.first_memorized_step
        return steps * self.batch_size * self.memorized_share / max(self.data.n_memorized, 1)


def config_to_dict(cfg: TestbedConfig) -> dict:
    return asdict(cfg)


def _lists_to_tuples(fields: dict[str, Any]) -> dict[str, Any]:
    """JSON has no tuples: the channel and block lists of the model configs come back as lists."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def config_from_dict(d: dict) -> TestbedConfig:
    """Inverse of `config_to_dict` (nested dataclasses rebuilt, tuples restored)."""
    m = d.get("model", {})
    model = ModelConfig(
        vae=VAEConfig(**_lists_to_tuples(m.get("vae", {}))),
        text=TextConfig(**m.get("text", {})),
        unet=UNetConfig(**_lists_to_tuples(m.get("unet", {}))),
        scheduler=SchedulerConfig(**m.get("scheduler", {})),
    )
    rest = {k: v for k, v in d.items() if k not in ("data", "model")}
    rest.setdefault("memorized_start", 0.0)  # configs written before the option existed started at step 0
    return TestbedConfig(data=DataConfig(**d.get("data", {})), model=model, **rest)
