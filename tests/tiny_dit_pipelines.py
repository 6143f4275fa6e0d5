"""Tiny DiT-family pipelines built from config (offline, random weights): PixArt-α, SD3 and Flux.

Their denoiser is a `transformer` whose blocks hold diffusers FeedForwards: PixArt's BasicTransformerBlocks (`ff`),
SD3's joint blocks (`ff` on image tokens, `ff_context` on text tokens; the last block has no `ff_context`), Flux's
double-stream blocks (`ff`, `ff_context`; its single-stream blocks fuse the MLP into `proj_out` and hold no
FeedForward). The T5 tokenizer is a Unigram model over a few whole words and the letters, built in memory.

Images are 16x16 pixels (8x8 latents) so a call takes milliseconds; pass `TINY_SIZE` as height/width to the
pipelines whose default size is fixed (Flux's is 1024 px).
"""
from __future__ import annotations

import string

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from tiny_pipelines import WORDS, scheduler, tiny_text_encoder, tiny_tokenizer, tiny_vae

TINY_SIZE = 16  # pixels; the tiny VAE downsamples by 2, so 8x8 latents


def tiny_t5_tokenizer(max_length: int = 12) -> T5Tokenizer:
    """A T5 (Unigram) tokenizer: whole-word pieces for WORDS, single letters for anything else; no download."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + word, -1.0) for word in WORDS]
    vocab += [(letter, -5.0) for letter in string.ascii_lowercase + string.digits]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def tiny_t5_encoder(tokenizer, d_model: int = 32, seed: int = 0) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    return T5EncoderModel(config).eval()


def pixart_pipeline(seed: int = 0) -> PixArtAlphaPipeline:
    """PixArt-α traits: adaLN-single BasicTransformerBlocks with cross-attention to T5, learned sigma
    (8 channels out)."""
    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=32,
        in_channels=4, out_channels=8, cross_attention_dim=16, activation_fn="gelu-approximate",
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    ).eval()
    return PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=tiny_t5_encoder(tokenizer, seed=seed),
        vae=tiny_vae(seed),
        transformer=transformer,
        scheduler=scheduler(),
    )


def sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """SD3 traits: MMDiT joint blocks (image `ff` + text `ff_context`, none in the last block), three text encoders,
    flow matching."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=8,
    ).eval()
    tokenizer_3 = tiny_t5_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(tiny_tokenizer(), hidden=16, projection=True, seed=seed),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=tiny_text_encoder(tiny_tokenizer(), hidden=16, projection=True, seed=seed + 1),
        tokenizer_2=tiny_tokenizer(),
        text_encoder_3=tiny_t5_encoder(tokenizer_3, d_model=32, seed=seed + 2),
        tokenizer_3=tokenizer_3,
    )


def flux_vae(seed: int = 0) -> AutoencoderKL:
    """Flux packs 2x2 latent patches, so its transformer's 4 input channels are 1 latent channel."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8), latent_channels=1,
        norm_num_groups=4, layers_per_block=1, sample_size=16, shift_factor=0.0609, scaling_factor=1.5035,
    ).eval()


def flux_pipeline(seed: int = 0) -> FluxPipeline:
    """Flux-dev traits: double-stream blocks (`ff`, `ff_context`) and single-stream blocks, rotary embeddings, a
    guidance embedding instead of a classifier-free-guidance batch (guidance distillation)."""
    tokenizer_2 = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8),
    ).eval()
    tokenizer = tiny_tokenizer()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=flux_vae(seed),
        text_encoder=tiny_text_encoder(tokenizer, hidden=32, seed=seed),
        tokenizer=tokenizer,
        text_encoder_2=tiny_t5_encoder(tokenizer_2, d_model=32, seed=seed + 1),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


DIT_BUILDERS = {"pixart": pixart_pipeline, "sd3": sd3_pipeline, "flux": flux_pipeline}
