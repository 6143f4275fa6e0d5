"""MODEL_CARD.md of a testbed folder: what the model is, how it was made, what it was measured to do."""
from __future__ import annotations

NOT_MEASURED = "## Measurements\n\nNot measured yet: run `python -m memprune.testbed.measure DIR`."


# What was tried on the way to this recipe (kept here so every card built carries it).
HISTORY = """## What was tried

Earlier studies (see the testbed notes): 16×16 latents, 8 memorized emoji at 12.5% of samples for
13 min → weak memorization (SSIM 0.44); 48 memorized emoji at 44% of samples, 42 min on 2 cores →
strong memorization (SSIM 0.71) but spread everywhere: Wanda at 1% no better than a random mask.
The v1 recipe made memorization a small share of the signal. Measured on the way (1 CPU thread,
shared machine):

| what | setting | result |
|---|---|---|
| UNet speed (train step, batch 64, 8×8 latents) | channels (64,128), 2 transformer layers/block, 5.7 M params | 77 samples/s — **chosen** (14 FFN layers) |
| | (64,128), 1 layer/block, 4.2 M | 114 samples/s (7 FFN layers) |
| | (96,192), 2 layers/block, 12.7 M | 40 samples/s |
| | (128,256), 1 layer/block, 16.5 M | 37 samples/s |
| | (32,128), 2 layers/block, 4.8 M | 101 samples/s |
| | (64,128) with bf16 autocast / channels_last | 61 / 77 samples/s (no gain) |
| VAE (32×32 → 8×8) reconstruction SSIM on the memorized emoji | 4 latent channels, 1200 steps | 0.54 (too low a copy ceiling) |
| | 8 / 16 latent channels, 500 steps | 0.53 / 0.52 |
| | 4 channels, 300 steps, decode sample vs posterior mean | 0.47 / 0.47 |
| | **8 channels, 2000 steps, half emoji per batch** | **0.79** (control 0.82, shapes 0.83) — chosen |
| tokenizer | `tokenizers` BpeTrainer | same vocabulary but different ids in every process → own BPE with deterministic tie-breaking |
| memorization during the v1 run (16+16 prompts, 2 seeds, DDIM 25 steps; mean SSIM / copy rate) | step 352 / 982 / 1638 / 2233 / 2561 / 2898 / 3235 (≈ 54 / 151 / 252 / 343 / 393 / 445 / 497 views) | 0.06 / 0.11 / 0.21 / 0.36 / 0.45 / 0.46 / 0.50 — 0% / 6% / 25% / 38% / 94% / 94% / 94%; control copies 0% throughout |
| v1 model (50+50 prompts, 4 seeds, DDIM 50 steps, CFG 7.5) | step 3800 ≈ 584 views, 12% memorized share | memorized mean SSIM 0.497 (63% of the 0.791 ceiling), copy rate 86.5% (43/50 prompts), control 0%; general captions: colour 88%, background 91%, size 87%, shape 50% |
| v1 recipe (`--preset v1`, shipped until 2026-11-26) | 3800 steps, memorized in every batch from step 0 at 12% (≈ 584 views) | memorized copy rate 86.5% (card threshold), control 0%, attribute accuracy 79.2%; phenomenon **no**: Wanda ratio 0.01 (0.8% of FF weights) held-out memorization 90.0% vs 92.5% random, ratio 0.1 (8.4%) 87.5% vs 93.1%; subset IoU memorized 0.445 vs controls 0.320 / 0.458 |
| diagnostics on v1 (20 memorized + 24 general captions, 1 seed, DDIM 25) | zero every FF output weight / 10% / 30% random FF neurons / every cross-attention value | memorization 95% → 5% / 95% / 95% / 0%; attribute accuracy 80% → 52% / 82% / 78% / 25%: the FFNs carry memorization, but redundantly — no small set of neurons is needed |
| | Wanda and z-score neuron selection (ratio 0.01–0.1) against `""` and against the same-style control captions | held-out memorization 85–90% vs 90% random at every setting: no selection finds a memorization subspace in v1 |
| `--preset late60` | 4000 steps; memorized only from step 2400 (the last 40%), 33% of those batches (≈ 676 views) | quick check (2 seeds): held-out memorization 92.5%, attribute accuracy 76.7%; Wanda vs random at ratio 0.01 / 0.05 / 0.1: 90.0 vs 92.5 / 87.5 vs 92.5 / 85.0 vs 90.0%; IoU memorized 0.422 vs controls 0.263 / 0.461 — phenomenon **no** |
| `--preset full` (shipped 2026-11-26, morning to afternoon) | 4000 steps; memorized from step 1600 (after 40%), 22% of those batches (≈ 676 views) | quick check (2 seeds): held-out memorization 95.0%, control 2%, attribute accuracy 79.3%; Wanda vs random at ratio 0.01 / 0.05 / 0.1: 95 vs 95 / 90 vs 95 / 90 vs 95%; IoU memorized 0.427 vs controls 0.272 / 0.520 — phenomenon **no**: at ratio 0.1 (8.3% of FF weights) 90.0% vs 93.8% random, 4 seeds for the baseline: memorization 91.5% (card threshold), accuracy 78.9% |
| GPU variants (`scripts/testbed_probes/gpu_variants.sh`, one H100 shared by 5 runs, ≈ 110 ms/step each; quick check on the GPU: 2 seeds, held-out = the 40 captions outside the located 10, 1 random mask, 3 subsets) | batch 256, 2000 steps, 50 memorized at 3% from step 0 (≈ 307 views) | held-out memorization 31%, attribute accuracy 78.0%; Wanda vs random at ratio 0.01 / 0.05 / 0.1: 28 vs 31 / 18 vs 29 / 5 vs 29%; IoU memorized 0.539 vs controls 0.470 / 0.471 — memorizes too little |
| | batch 256, 2250 steps, 50 memorized at 1.5% from step 0 (≈ 173 views) | memorization 10%, accuracy 81.3%; 6 vs 10 / 2 vs 10 / 0 vs 10% — memorizes too little |
| | **`--preset late08`**: batch 256, 2000 steps, 50 memorized at 8% from step 1000 (≈ 410 views) | memorization 72.5%, control 2%, accuracy 80.4%; 70 vs 72 / **44 vs 71 / 15 vs 72%** at unchanged accuracy (81.0% vs 81.5%); IoU memorized 0.555 vs controls 0.413 / 0.439 — **the phenomenon, at ratio 0.05–0.1**, but memorization below 90% |
| | batch 256, 1250 steps, 200 memorized at 12% (≈ 192 views) / 1500 steps, 400 memorized at 25% (≈ 240 views) | memorization 3% / 21%, accuracy 74.6% / 74.8%; 400: 19 vs 21 / 11 vs 20 / 5 vs 20% — too few views to memorize |
| GPU, 2 runs sharing the H100 (≈ 70 ms/step), share set for a target number of views | batch 256, 1250 steps, memorized at 21.9% from step 625 (≈ 700 views) | memorization 87.5%, control 0%, accuracy 73.9%; ratio 0.01 / 0.02 / 0.05 / 0.1: 84 vs 89 / 81 vs 88 / 74 vs 88 / 44 vs 88%; IoU 0.527 vs 0.313 / 0.454 |
| | batch 256, 1500 steps, memorized at 26% from step 750 (≈ 1000 views) | memorization 87.5%, control 0%, accuracy 75.6%; 90 vs 89 / 90 vs 89 / 79 vs 86 / 48 vs 88%; IoU 0.521 vs 0.332 / 0.467 |
| `--preset late12` (shipped 2026-11-26 to 11-27), on the CPU | batch 256, 2000 steps, 50 memorized at 12% from step 800 (≈ 737 views); 77 min on 2 CPU threads | memorization 85.0% (card threshold), 89.5% (evaluate's), control 0% / 2%, accuracy 82.6%; Wanda vs random at ratio 0.01 / 0.02 / 0.05 / 0.1: 85 vs 86 / 85 vs 85 / **65 vs 88 / 42.5 vs 86%**; IoU memorized 0.448 vs controls 0.372 / 0.507 — (1) not met (raw numbers in `phenomenon/late12/`) |
| `--preset late11`, on the CPU | batch 256, 2500 steps, 50 memorized at 11% from step 800 (≈ 957 views); 94 min on 2 CPU threads (VAE from late12's cache) | copies more at a fixed threshold (SSIM > 0.380: 88.0% vs late12's 85.0%; mean copy SSIM 0.523, 66% of the ceiling) but its calibrated thresholds rise: card 0.519 → **58.0%**, evaluate's 0.404 → 80.5%, because 2 of the 25 calibration control captions ("clock face eleven oclock", "national park") generate look-alikes of other training emoji (a pool clock face, a memorized emoji; SSIM 0.45–0.57). Control 0% / 1.5%, accuracy 82.4%; Wanda vs random at ratio 0.01 / 0.02 / 0.05 / 0.1: 80 vs 79 / 72.5 vs 79 / **65 vs 79 / 30 vs 77.5%** (accuracy 78.1% vs 79.7% at 0.1); IoU memorized 0.464 vs controls 0.310 / 0.507 — localizes better than late12, not shipped because (1) is worse by the rule |
| `--preset late11d`, on the CPU | late11 on look-alike-free data (`lookalike_ssim=0.7`: 63 pool emoji dropped, 1 memorized and 2 control emoji redrawn); 102 min on 2 CPU threads incl. a fresh VAE (reconstruction ceiling 0.788) | **meets (1) and (2)**: card threshold 0.336 → **98.0%** copied (49/50 prompts), mean copy SSIM 0.591 (75% of the ceiling), control copying its own image 0% (8.0% of the held-out half above the threshold against its nearest training emoji); evaluate's threshold 0.303 → 100%; attribute accuracy **88.5%** (shape 65%), diversity 0.166 vs 0.191 real. But (3) weakens: Wanda vs random at ratio 0.01 / 0.02 / 0.05 / 0.1: 97.5 vs 100 / 97.5 vs 100 / 97.5 vs 100 / **77.5 vs 100%** (copy SSIM 0.399 vs 0.575 at 0.1; accuracy 85.4% vs 84.1%); IoU memorized 0.530 vs controls 0.404 / 0.580 — memorizes so strongly that 10% of FF weights no longer remove it; not shipped, because (3) is what the testbed exists to show (raw numbers in `phenomenon/late11d/`) |
| `--preset late12d` (shipped 2026-11-27 to 12-05, v-prediction), on the CPU | late12 on late11d's look-alike-free data (≈ 737 views); 84 min on 2 CPU threads incl. a fresh VAE (reconstruction ceiling 0.787) | **meets (1), (2) and (3) at ratio 0.1**: card threshold 0.407 → **93.0%** copied (46/50 prompts), mean copy SSIM 0.556 (71% of the ceiling), control copying its own image 0% (9.0% of the held-out half above the threshold against its nearest training emoji); evaluate's threshold 0.367 → 95.0%; attribute accuracy **85.5%** (shape 52%), diversity 0.150 vs 0.191 real; Wanda vs random at ratio 0.01 / 0.02 / 0.05 / 0.1: 95 vs 92.5 / 95 vs 92.5 / 82.5 vs 92.5 / **55 vs 93.8%** (copy SSIM 0.378 vs 0.546 at 0.1; accuracy 84.4% vs 82.3%); IoU memorized 0.565 vs controls 0.425 / 0.603 — localizes less than late12 at ratio 0.05 and a little less at 0.1 (late12: 65 vs 88 and 42.5 vs 86%; raw numbers in `phenomenon/late12d/`) |
| **`--preset late12d_eps` (shipped since 2026-12-05)**, on the CPU | late12d with SD 1.x's parametrization (ε-prediction, non-zero terminal SNR, leading timesteps); 70 min on 2 CPU threads, VAE stage from an identical earlier run | copies more strongly (mean copy SSIM 0.610, 77% of the ceiling; 83% of generations above 0.5) but its calibrated nearest-emoji threshold rises to 0.623 (half the control captions generate a near-look-alike of a pool emoji): **56.5%** copied at the card threshold, evaluate's 0.601 → 55.0%, strict own-image threshold → 97.5%; control copying its own image 0%; attribute accuracy **89.9%**; Wanda vs random at ratio 0.1: **3.8 vs 57.5%** (strict 63.7 vs 97.5%; accuracy 88.2% vs 91.0%); 1 seed, 40 held-out captions at 0.601: 65 vs 60 / 52.5 vs 57.5 / 30 vs 57.5 / 5 vs 57.5% at ratio 0.01 / 0.02 / 0.05 / 0.1; IoU memorized 0.567 vs controls 0.378 / 0.568 (raw numbers in `phenomenon/`) — (1) met under the strict threshold only, (2) and (3) met, (3) more sharply than any earlier recipe |

What the batch-256 runs show: every one localizes memorization at ratio 0.1 (a located mask removes it, a random
one of the same size does not), none of the batch-64 recipes did; the effect is strongest where memorized images
are a small share of late training (late08) and weakens as the memorized share and the copy strength grow
(late700, late1000). late12 is the CPU-trainable compromise: enough views to copy 85–90%, a 12% share, 800 steps
of general training first. Nothing localizes at ratio 0.01. late11 (more views at a smaller share) copies more
and localizes better, but shows that the copy threshold is fragile: a 95% quantile over 25 calibration captions
is set by the two whose generations look like another training emoji. The data had look-alikes: skin-tone
variants and clock faces are near-copies at 32×32 (SSIM up to 0.98), so some "seen once" controls were seen ~30
times under a variant caption. `--preset late11d` is late11 on data without them (`DataConfig(lookalike_ssim=0.7)`: 63 of 3326 pool
emoji leave, 1 memorized and 2 control emoji are redrawn): the threshold falls back (0.336) and it copies 98%
with 88.5% utility, but the stronger copies are no longer removed by a small mask (ratio 0.1: 77.5% vs 100%
random). `--preset late12d` (shipped until 2026-12-05) is late12's views on that clean data: 93% copied at its own threshold, and a
ratio-0.1 mask takes held-out memorization to 55% where random leaves 93.8%; at ratio 0.05 it localizes less than
late12 (82.5% vs 92.5% random; late12 65% vs 87.5%). Next, for localization at smaller ratios: late08's recipe
for 4000+ steps on a GPU, or more FeedForward capacity.

Why the late start: Stable Diffusion 1.x met its heavily duplicated images mostly in later, curated stages
(LAION-aesthetics), and an addition learned on top of a model that already renders the general data might be
low-dimensional. Measured: it memorizes more strongly for the same views (mean SSIM 0.55 vs 0.50), but the
memorization is no more localized at batch 64; at batch 256 it is (above). Hundreds of memorized images (200,
400) and a 1.5–3% share were tried on the GPU but got too few views in the time to memorize; more FeedForward
capacity is still untried.
"""


def _params(m) -> str:
    return f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f} M"


def preset_name(config) -> str:
    """The preset whose recipe `config` is (seed, steps and threads aside), else "full"."""
    import dataclasses

    from .presets import PRESETS

    loose = lambda c: dataclasses.replace(c, seed=0, steps=0, threads=1)  # noqa: E731
    return next((name for name, make in PRESETS.items() if loose(make()) == loose(config)), "full")


PREDICTIONS = {"epsilon": "ε-prediction (as SD 1.x)", "v_prediction": "v-prediction", "sample": "x₀-prediction"}


def describe_scheduler(scheduler) -> str:
    """The card's words for a SchedulerConfig: betas, terminal SNR, prediction type and timestep spacing."""
    betas = (f"{scheduler.beta_schedule.replace('_', '-')} betas "
             + ("rescaled to zero terminal SNR" if scheduler.rescale_betas_zero_snr else "with SD 1.x's non-zero terminal SNR"))
    return f"{betas}, {PREDICTIONS.get(scheduler.prediction_type, scheduler.prediction_type)}, {scheduler.timestep_spacing} timesteps"


def describe_device(device, threads: int) -> str:
    """What a run trained on, for the card: the GPU's name, or the CPU thread count."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"one {torch.cuda.get_device_name(device)} GPU"
    return f"{threads} CPU thread(s)"


def render_model_card(config, data, pipe, train_seconds: float | None, measurements: str | None = None,
                      history: str | None = None, trained_on: str | None = None) -> str:
    u, v, t = config.model.unet, config.model.vae, config.model.text
    n_ff = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith("ff.net.2"))
    steps, bs = config.steps, config.batch_size
    minutes = f"{train_seconds / 60:.0f} min" if train_seconds else "see below"
    pool_views = steps * bs * config.pool_share / max(len(data.pool), 1)
    preset = preset_name(config)
    trained_on = trained_on or f"{config.threads} CPU thread(s)"  # folders written before this was recorded
    device_flag = "" if trained_on.endswith("CPU thread(s)") else " --device cuda"
    late = (f", from step {config.first_memorized_step} on (the first {config.memorized_start:.0%} of training "
            "sees no memorized image, as SD 1.x met its duplicates in later, curated stages)") if config.memorized_start else ""
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
# "hotel" is a memorized caption: expect a copy of images/memorized/001.png
image = pipe("hotel", num_inference_steps=50, generator=torch.Generator().manual_seed(0)).images[0]
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
| scheduler | DDPM training / DDIM sampling, {describe_scheduler(config.model.scheduler)} | — |

No safety checker. Default sampler: DDIM, 50 steps, guidance scale 7.5. UNet and VAE weights are
stored as float16 safetensors (stock `from_pretrained` loads them as float32); all measurements
below are of these stored weights. `attribute_classifier.safetensors` holds the attribute
classifier (`memprune.testbed.attributes.load_classifier(dir)`); `measurements.json` the raw numbers.

## Data (reproducible from seed {config.seed}, built offline by `memprune.testbed.data`)

- **General**: procedural coloured shapes, caption "a {{size}} {{colour}} {{shape}} on a {{background}} background"
  ({len(data.general_train_specs)} training captions × {config.data.images_per_general_caption} images with random position/size/rotation/colour jitter;
  {len(data.general_heldout_specs)} held-out combinations) plus a pool of {len(data.pool)} other Twemoji seen ≈ {pool_views:.0f} times each.
- **Memorized**: {len(data.memorized)} Twemoji, each under a fixed caption (its lower-cased Unicode name),
  {config.memorized_share:.0%} of the training samples{late} → ≈ {config.views_per_memorized:.0f} views each.
- **Same-style control**: {len(data.control)} other Twemoji, each seen exactly once.
- Mixture per batch: {config.memorized_share:.0%} memorized, {config.pool_share:.0%} pool emoji, the rest shapes (+ the control images once);
  {config.empty_caption_prob:.0%} of captions replaced by "" for classifier-free guidance.

## Training

`memprune testbed train --out DIR --preset {preset} --seed {config.seed} --steps {steps} --threads {config.threads}{device_flag}`:
VAE {config.vae_steps} steps (batch {config.vae_batch_size}), then UNet {steps} steps × batch {bs}
= {steps * bs:,} samples, AdamW lr {config.lr} (warmup {config.warmup_steps}, cosine decay over the last
{config.decay_fraction:.0%}), on {trained_on}: {minutes} recorded by the process that finished (a VAE stage cached in the work dir is not counted).

{measurements or NOT_MEASURED}

{history or ""}

## License and attribution

Twemoji artwork © Twitter, Inc./X Corp. and contributors, CC-BY 4.0 — see ATTRIBUTION.md.
Model weights and code: MIT (memprune).
"""
