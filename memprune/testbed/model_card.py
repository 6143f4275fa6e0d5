"""MODEL_CARD.md of a testbed folder: what the model is, how it was made, what it was measured to do."""
from __future__ import annotations


NOT_MEASURED = "## Measurements\n\nNot measured yet: run `python -m memprune.testbed.measure DIR`."


# What was tried on the way to this recipe (kept here so every card built carries it).
HISTORY = """## What was tried

See the testbed notes for the two earlier studies (44% memorized share: strong but spread-out
memorization; 12.5% share, 13 min: weak memorization)."""


def _params(m) -> str:
    return f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f} M"


def render_model_card(config, data, pipe, train_seconds: float | None, measurements: str | None = None,
                      history: str | None = None) -> str:
    u, v, t = config.model.unet, config.model.vae, config.model.text
    n_ff = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith("ff.net.2"))
    steps, bs = config.steps, config.batch_size
    minutes = f"{train_seconds / 60:.0f} min" if train_seconds else "see below"
    pool_views = steps * bs * config.pool_share / max(len(data.pool), 1)
    return f"""# memprune memorization testbed

A tiny text-to-image latent diffusion model, a stock diffusers `StableDiffusionPipeline`, trained
from scratch offline so that it **memorizes a known set of training images** while also learning a
general distribution. It exists to test methods that locate and prune memorization neurons
(Chavhan et al. 2024) where real Stable Diffusion weights cannot be used. It is a research
fixture, not a useful image generator.

## Use

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("data/testbed")   # 32×32 images, CPU is fine
image = pipe("taco", num_inference_steps=50, generator=torch.Generator().manual_seed(0)).images[0]
```

Captions: `captions/memorized.csv` (memorized, with ground-truth image), `captions/non_memorized_same_style.csv`
(same style, each seen once in training: the control), `captions/general_heldout.csv` (general
captions never seen in training, with their attributes), `captions/general_train.csv`.

## Model

| part | what | parameters |
|---|---|---|
| VAE | AutoencoderKL, channels {tuple(v.block_out_channels)}, 4× downsampling: 32×32×3 → {v.latent_channels}×8×8, no mid attention, scaling factor {pipe.vae.config.scaling_factor:.4f} | {_params(pipe.vae)} |
| text encoder | CLIPTextModel, hidden {t.hidden_size}, {t.num_hidden_layers} layers, max length {t.max_length}; **random init, frozen** (SD's text encoder is frozen too) | {_params(pipe.text_encoder)} |
| tokenizer | CLIPTokenizer from a BPE learned (deterministically) on all caption words as CLIP's `tokenizers` pre-tokenizer splits them, + the byte alphabet: every caption word is one token, any text tokenizes | {len(pipe.tokenizer)} tokens |
| UNet | UNet2DConditionModel, channels {tuple(u.block_out_channels)}, {u.layers_per_block} resnet/block, {u.transformer_layers_per_block} transformer layers/block, cross-attention at every resolution; {n_ff} FeedForward layers (`ff.net.2` inputs are the neurons memprune prunes) | {_params(pipe.unet)} |
| scheduler | DDPM training / DDIM sampling, scaled-linear betas rescaled to zero terminal SNR, v-prediction, trailing timesteps | — |

No safety checker. Default sampler: DDIM, 50 steps, guidance scale 7.5. UNet and VAE weights are
stored as float16 safetensors (stock `from_pretrained` loads them as float32); all measurements
below are of these stored weights. `attribute_classifier.safetensors` holds the attribute
classifier (`memprune.testbed.attributes.load_classifier(dir)`); `measurements.json` the raw numbers.

## Data (reproducible from seed {config.seed}, built offline by `memprune.testbed.data`)

- **General**: procedural coloured shapes, caption "a {{size}} {{colour}} {{shape}} on a {{background}} background"
  ({len(data.general_train_specs)} training captions × {config.data.images_per_general_caption} images with random position/size/rotation/colour jitter;
  {len(data.general_heldout_specs)} held-out combinations) plus a pool of {len(data.pool)} other Twemoji seen ≈ {pool_views:.0f} times each.
- **Memorized**: {len(data.memorized)} Twemoji, each under a fixed caption (its lower-cased Unicode name),
  {config.memorized_share:.0%} of all training samples → ≈ {config.views_per_memorized:.0f} views each.
- **Same-style control**: {len(data.control)} other Twemoji, each seen exactly once.
- Mixture per batch: {config.memorized_share:.0%} memorized, {config.pool_share:.0%} pool emoji, the rest shapes (+ the control images once);
  {config.empty_caption_prob:.0%} of captions replaced by "" for classifier-free guidance.

## Training

`memprune testbed train --out DIR --seed {config.seed} --steps {steps} --threads {config.threads}`:
VAE {config.vae_steps} steps (batch {config.vae_batch_size}), then UNet {steps} steps × batch {bs}
= {steps * bs:,} samples, AdamW lr {config.lr} (warmup {config.warmup_steps}, cosine decay over the last
{config.decay_fraction:.0%}), on {config.threads} CPU thread(s): {minutes} in total.

{measurements or NOT_MEASURED}

{history or ""}

## License and attribution

Twemoji artwork © Twitter, Inc./X Corp. and contributors, CC-BY 4.0 — see ATTRIBUTION.md.
Model weights and code: MIT (memprune).
"""
