"""Tiny Stable Diffusion 1.x-, 2.x- and XL-like pipelines built from config (offline, random weights)."""
from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

WORDS = [
    "a",
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "cat",
    "dog",
    "on",
    "the",
    "photo",
    "of",
    "white",
    "background",
]


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer with whole-word tokens for WORDS and the byte alphabet for anything else."""
    symbols = list(bytes_to_unicode().values())
    vocab_list = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in vocab_list:
                vocab_list.append(pieces[0])
    vocab = {token: index for index, token in enumerate(dict.fromkeys(vocab_list))}
    merges = list(dict.fromkeys(merges))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=16, pad_token="<|endoftext|>")


def tiny_text_encoder(tokenizer, hidden: int = 32, projection: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=hidden,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
    ).eval()


def scheduler() -> DDIMScheduler:
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


UNET_COMMON = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8,
)


def _sd_pipeline(seed: int, **unet_config) -> StableDiffusionPipeline:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_COMMON, cross_attention_dim=32, **unet_config).eval()
    return StableDiffusionPipeline(
        vae=tiny_vae(seed), text_encoder=tiny_text_encoder(tokenizer, seed=seed), tokenizer=tokenizer, unet=unet,
        scheduler=scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def sd1_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """SD 1.x traits: conv projections in the transformers, one int head dim."""
    return _sd_pipeline(seed, attention_head_dim=8)


def sd2_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """SD 2.x traits: linear projections in the transformers, per-block head dims, upcast attention."""
    return _sd_pipeline(seed, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True)


def sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL traits: several transformer layers per block, text_time added embeddings, two text encoders."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16,
        cross_attention_dim=32,
        norm_num_groups=8,
    ).eval()
    return StableDiffusionXLPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(tokenizer, hidden=16, seed=seed),
        text_encoder_2=tiny_text_encoder(tokenizer, hidden=16, projection=True, seed=seed + 1),
        tokenizer=tokenizer,
        tokenizer_2=tiny_tokenizer(),
        unet=unet,
        scheduler=scheduler(),
        force_zeros_for_empty_prompt=False,
    )


BUILDERS = {"sd1": sd1_pipeline, "sd2": sd2_pipeline, "sdxl": sdxl_pipeline}


def save_builders(builders, tmp_path_factory, prefix: str) -> dict:
    """Each builder's pipeline saved once into its own folder, as a user's local model folder."""
    folders = {}
    for name, build in builders.items():
        folder = tmp_path_factory.mktemp(f"{prefix}_{name}")
        build().save_pretrained(str(folder), safe_serialization=True)
        folders[name] = folder
    return folders
