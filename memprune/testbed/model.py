"""Configurations of the testbed's networks and assembly of a stock `StableDiffusionPipeline`.

Everything is scaled down for CPU training: 32×32 RGB images, a VAE that downsamples 4× to
4×8×8 latents, a frozen randomly initialised CLIP text encoder (Stable Diffusion's text encoder
is frozen too; a random one still gives distinct, stable caption embeddings), and a small UNet
with cross-attention at every resolution and several transformer layers per block so that the
FeedForward layers (the ones memprune prunes) have room for dedicated neurons.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


@dataclass
class VAEConfig:
    # Three blocks = two downsamplings: 32×32 pixels → 8×8 latents (a 4× VAE).
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 8  # 8×8×8 latents: 6× compression; 4 channels lost too much emoji detail
    layers_per_block: int = 1
    norm_num_groups: int = 8
    sample_size: int = 32


@dataclass
class TextConfig:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    max_length: int = 16  # longest caption is 14 tokens with BOS/EOS; nothing is truncated


@dataclass
class UNetConfig:
    sample_size: int = 8
    block_out_channels: tuple[int, ...] = (64, 128)
    layers_per_block: int = 1
    transformer_layers_per_block: int = 2
    attention_head_dim: int = 4  # diffusers' name for the number of heads
    norm_num_groups: int = 32


@dataclass
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    # Zero terminal SNR + v-prediction + trailing timesteps (Lin et al. 2024) removes the
    # colour cast on flat backgrounds that an SD schedule gave in the earlier study.
    rescale_betas_zero_snr: bool = True
    prediction_type: str = "v_prediction"
    timestep_spacing: str = "trailing"


@dataclass
class ModelConfig:
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


def build_vae(cfg: VAEConfig) -> AutoencoderKL:
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.sample_size,
        mid_block_add_attention=False,  # attention over 8×8 adds cost and nothing we need
    )


def build_text_encoder(cfg: TextConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=cfg.hidden_size,
    )
    model = CLIPTextModel(config)
    model.requires_grad_(False)
    return model.eval()


def build_unet(cfg: UNetConfig, latent_channels: int, cross_attention_dim: int) -> UNet2DConditionModel:
    n = len(cfg.block_out_channels)
    return UNet2DConditionModel(
        sample_size=cfg.sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        transformer_layers_per_block=cfg.transformer_layers_per_block,
        attention_head_dim=cfg.attention_head_dim,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=cfg.norm_num_groups,
    )


def train_scheduler(cfg: SchedulerConfig) -> DDPMScheduler:
    return DDPMScheduler(**asdict(cfg), clip_sample=False)


def sample_scheduler(cfg: SchedulerConfig) -> DDIMScheduler:
    # steps_offset only matters for "leading" spacing; 1 is what diffusers expects in SD configs.
    return DDIMScheduler(**asdict(cfg), clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def assemble_pipeline(vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                      unet: UNet2DConditionModel, sched: SchedulerConfig) -> StableDiffusionPipeline:
    """A stock SD pipeline without safety checker (the testbed has nothing to filter)."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sample_scheduler(sched),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
