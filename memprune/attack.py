"""`memprune attack`: does an edit survive an attacker? A DoRI-style adversarial-embedding robustness check.

Kowalczuk, Hintersdorf, Struppek et al. (arXiv 2507.16880, "Finding Dori") showed that pruning-based mitigations
(NeMo, Wanda) hide memorized images from the original prompt while a small change of the prompt's *text embedding*
brings the copy back. This module measures that on memprune's models: for every memorized prompt with a known
training image, on the unedited model and on every edited model,

1. encode the prompt (token embeddings e, as the pipeline would) and the training image x_0 (VAE encoder mean times
   the VAE scaling factor, the image resized to the pipeline's default size);
2. optimise a perturbation δ of the token embeddings (all tokens; SDXL's pooled embedding and time ids stay as
   encoded) with Adam (lr ``attack_lr``, torch defaults otherwise) for ``attack_steps`` steps on the denoising
   (training) loss of the image: per step ``noise_samples`` pairs (t ~ U{0..T-1}, ε ~ N(0, I)), the mean squared error
   between the denoiser's prediction for x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε under e + δ and its target (ε, or the velocity
   for v-prediction models). t and ε come from a CPU generator seeded with ``attack_seed``, the same draws for every
   prompt and model, so the attack is deterministic and every model faces the same budget;
3. after every step project δ onto the ball ‖δ‖₂ ≤ ``bound`` · ‖e‖₂ (Frobenius norm over tokens and channels: a
   *relative* budget, because embedding scales differ between text encoders);
4. generate with FRESH seeds (``seed`` .. ``seed + seeds − 1``, default from 1000, never the attack's seed) from e + δ
   (attacked) and from e (baseline, the zero-step attack), the negative prompt embedding as the pipeline computes it;
5. score the copy similarity of every generation to its training image with evaluate's similarity backend and count a
   copy when it is strictly above the copy threshold (evaluate's ``memorization_rate``).

Defaults (cheap enough for the embedded testbed on a CPU; an attack on 10 prompts takes minutes per model):
``attack_steps`` 50, ``attack_lr`` 0.01, ``noise_samples`` 4, ``bound`` 0.25, ``seeds`` 2, ``steps`` 50. The objective
(the denoising loss of the memorized image under a perturbed text embedding) follows DoRI's description; their code
and exact budget (optimiser settings, steps, norm constraint on SD v1.4) were not available to us, so these values
are our choice, sized for the testbed: on it, 50 steps move the embedding by about 0.15 (unedited) to 0.2 (Wanda
prune, ratio 0.1) of its norm, inside the bound, and bring the pruned model's held-out copies back.

Copy threshold — the same as evaluate's, by one of (first that applies): ``threshold`` (a number, e.g. from an
evaluate run's metrics.csv); ``threshold_from`` (an evaluate output folder: its ``copy_threshold`` row, refused when
its similarity backend differs); otherwise calibrated in this run exactly as evaluate calibrates it (the
``threshold_percentile``, 95, of the similarity of the unedited model's generations of the non-memorized ``control``
prompts — testbed default: its same-style captions — to their nearest known training image of the memorized and
control files), with this run's fresh seeds and steps.

Models are named as evaluate names them (so rows join in memprune.compare): ``unedited``; one ``--edited`` folder is
``edited``; several are named by folder (EvaluateSettings.edited_models() of ``compare`` = the folders). An edited model
whose tokenizer or text encoder differ from the base model's is refused (the attack perturbs the base's embedding
space; a different encoder would make "the same prompt" a different input).

Outputs (one folder, written atomically): ``metrics.csv`` (tidy model, group, metric, value; group
``memorized_held_out`` with ``exclude_prompts``, else ``memorized``): memorization_rate, copy_similarity (baseline,
same fresh seeds), memorization_rate_attacked, copy_similarity_attacked, denoising_loss(_attacked) (the objective
on the attack's draws, before and after), perturbation_norm_relative, attack_seconds_per_prompt, n_prompts,
n_generations, and copy_threshold (unedited); ``per_prompt.csv``; ``generations.csv``; ``run.json``.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .conditioning import (Conditioning, check_finite, default_size, encode, expand_rows, frozen, gradients_enabled,
                           pipeline_kwargs, predict_noise)
from .errors import MemPruneError
from .generate import GenerationSettings, guidance_scale, pipeline_call_kwargs, uses_cfg
from .latents import noised, prediction_kind, prediction_target, vae_encode
from .models import DEFAULT_MODEL, TESTBED_CAPTION_FILES, pipeline_modules, testbed_captions
from .prompts import PromptList, read_prompts

GENERATION_SEED = 1000  # first fresh generation seed: far from the attack's seed and from evaluate's 0..seeds-1


@dataclass
class AttackSettings:
    attack_steps: int = 50  # Adam steps on δ
    attack_lr: float = 0.01  # Adam learning rate
    bound: float = 0.25  # ‖δ‖₂ ≤ bound · ‖e‖₂
    noise_samples: int = 4  # (t, ε) draws per step
    attack_seed: int = 0  # seeds the (t, ε) draws

    def __post_init__(self):
        if self.attack_steps < 0:
            raise MemPruneError(f"--attack-steps must be 0 or more, got {self.attack_steps}.")
        if not self.attack_lr > 0:
            raise MemPruneError(f"--attack-lr must be positive, got {self.attack_lr}.")
        if not self.bound >= 0:
            raise MemPruneError(f"--bound must be 0 or more, got {self.bound}.")
        if self.noise_samples < 1:
            raise MemPruneError(f"--noise-samples must be at least 1, got {self.noise_samples}.")


@dataclass
class AttackRunSettings:
    model: str = DEFAULT_MODEL
    edited: tuple[str, ...] = ()
    prompts: str | None = None  # memorized prompts with an image column (testbed default: its memorized.csv)
    exclude_prompts: str | None = None  # locate's prompts_used.csv: attack only the held-out prompts
    num_prompts: int | None = None  # the first N (file order) of the attacked prompts
    control: str | None = None  # non-memorized prompts that calibrate the threshold (testbed: same-style captions)
    threshold: float | None = None
    threshold_from: str | None = None  # an evaluate output folder
    threshold_percentile: float = 95.0
    similarity: str = "ssim"
    sscd: str | None = None
    generation: GenerationSettings = field(default_factory=lambda: GenerationSettings(steps=50, seeds=2,
                                                                                       seed=GENERATION_SEED))
    attack: AttackSettings = field(default_factory=AttackSettings)

    def __post_init__(self):
        self.model = self.model or DEFAULT_MODEL
        if self.generation.steps < 1 or self.generation.seeds < 1:
            raise MemPruneError("--steps and --seeds must be at least 1.")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise MemPruneError(f"--num-prompts must be at least 1, got {self.num_prompts}.")
        if self.threshold is not None and self.threshold_from is not None:
            raise MemPruneError("Give either --threshold or --threshold-from, not both.")
        if not 0 < self.threshold_percentile <= 100:
            raise MemPruneError(f"--threshold-percentile must be in (0, 100], got {self.threshold_percentile}.")
        if self.sscd is None and self.similarity not in ("ssim", "l2"):
            raise MemPruneError(f"Unknown similarity '{self.similarity}': use ssim or l2, or give --sscd FILE.")
        seeds = range(self.generation.seed, self.generation.seed + self.generation.seeds)
        if self.attack.attack_seed in seeds:
            raise MemPruneError(f"--attack-seed {self.attack.attack_seed} is one of the generation seeds "
                                f"{seeds.start}..{seeds.stop - 1}: the attack must be scored on fresh seeds.")

    def with_defaults(self) -> "AttackRunSettings":
        from dataclasses import replace

        captions = testbed_captions(self.model)
        values = {}
        if self.prompts is None:
            if captions is None:
                raise MemPruneError("--prompts is required when --model is not the embedded testbed.")
            values["prompts"] = str(captions / TESTBED_CAPTION_FILES["memorized"])
        if self.control is None and self.threshold is None and self.threshold_from is None:
            if captions is None:
                raise MemPruneError("Give --threshold, --threshold-from (an evaluate folder) or --control (non-memorized "
                                    "prompts with training images) to set the copy threshold.")
            values["control"] = str(captions / TESTBED_CAPTION_FILES["control"])
        return replace(self, **values)

    def edited_models(self) -> dict[str, str]:
        """The names evaluate gives these folders (one --edited: "edited"; several: by folder, as --compare)."""
        from .evaluate import EvaluateSettings

        if len(self.edited) == 1:
            return EvaluateSettings(model=self.model, edited=self.edited[0]).edited_models()
        return EvaluateSettings(model=self.model, compare=tuple(self.edited)).edited_models()

    @property
    def group(self) -> str:
        return "memorized_held_out" if self.exclude_prompts is not None else "memorized"


# --------------------------------------------------------------------------------------------- the attack

def encode_image(pipe, image: torch.Tensor) -> torch.Tensor:
    """x_0 of a (3, H, W) image in [0, 1]: the VAE encoder's mean, shifted and scaled as the pipeline decodes it."""
    vae = pipe.vae
    return vae_encode(pipe, image[None].to(vae.device, vae.dtype) * 2 - 1)


def noise_draws(pipe, settings: AttackSettings, shape) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The attack's (t, ε) per step, from a CPU generator seeded with attack_seed (steps + 1: the last one scores)."""
    generator = torch.Generator("cpu").manual_seed(settings.attack_seed)
    total = pipe.scheduler.config.num_train_timesteps
    draws = []
    for _ in range(settings.attack_steps + 1):
        t = torch.randint(0, total, (settings.noise_samples,), generator=generator)
        noise = torch.randn((settings.noise_samples, *shape), generator=generator)
        draws.append((t, noise))
    return draws


def denoising_loss(pipe, x0: torch.Tensor, cond: torch.Tensor, conditioning: Conditioning, t: torch.Tensor,
                   noise: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the denoiser's prediction of x_t = add_noise(x_0, ε, t) against its training target."""
    scheduler = pipe.scheduler
    device, dtype = x0.device, x0.dtype
    t, noise = t.to(device), noise.to(device, dtype)
    x0 = x0.expand(len(t), *x0.shape[1:])
    prediction_type = prediction_kind(scheduler)
    if prediction_type not in ("epsilon", "v_prediction", "flow"):
        raise MemPruneError(f"The scheduler's prediction type '{prediction_type}' is not supported by the attack "
                            "(epsilon, v_prediction or flow matching).")
    noisy = noised(scheduler, x0, noise, t)
    target = prediction_target(scheduler, x0, noise, t)
    prediction = predict_noise(pipe, noisy, t, expand_rows(conditioning.with_cond(cond), len(t)))
    return torch.nn.functional.mse_loss(prediction.float(), target.float())


def project(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """δ scaled back onto the ball ‖δ‖₂ ≤ radius (unchanged inside it)."""
    norm = delta.norm()
    return delta * (radius / norm) if norm > radius else delta


@dataclass
class AttackResult:
    delta: torch.Tensor  # (1, T, D) the perturbation of the token embeddings
    loss_before: float  # the objective at δ = 0 on the scoring draw
    loss_after: float  # at the final δ, same draw
    losses: list[float]  # the objective at every step (its own draw)
    relative_norm: float  # ‖δ‖ / ‖e‖
    seconds: float


def attack_prompt(pipe, prompt: str, image: torch.Tensor, settings: AttackSettings,
                  conditioning: Conditioning | None = None) -> AttackResult:
    """Optimise δ for one prompt on `pipe` (module docstring, steps 1–3). No weight changes or gets a gradient."""
    tic = time.perf_counter()
    with gradients_enabled(), frozen(*pipeline_modules(pipe)):
        conditioning = (conditioning or encode(pipe, [prompt])).detached()
        x0 = encode_image(pipe, image).detach().clone()
        draws = noise_draws(pipe, settings, x0.shape[1:])
        embedding = conditioning.cond
        radius = settings.bound * float(embedding.norm())
        delta = torch.zeros_like(embedding, requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=settings.attack_lr)
        losses = []
        for t, noise in draws[:-1]:
            loss = denoising_loss(pipe, x0, embedding + delta, conditioning, t, noise)
            losses.append(float(loss.detach()))
            (gradient,) = torch.autograd.grad(loss, [delta])
            delta.grad = gradient
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                delta.copy_(project(delta, radius))
            check_finite(delta, [prompt], "adversarial embedding")
        delta = delta.detach()
        with torch.no_grad():
            t, noise = draws[-1]
            before = float(denoising_loss(pipe, x0, embedding, conditioning, t, noise))
            after = float(denoising_loss(pipe, x0, embedding + delta, conditioning, t, noise))
    relative = float(delta.norm() / embedding.norm()) if float(embedding.norm()) > 0 else 0.0
    return AttackResult(delta, before, after, losses, relative, time.perf_counter() - tic)


def generate_from_embeddings(pipe, conditioning: Conditioning, cond: torch.Tensor, generation: GenerationSettings,
                             size: tuple[int, int]) -> torch.Tensor:
    """(seeds, 3, H, W) images in [0, 1] of one prompt embedding, one CPU generator per seed (as memprune.generate)."""
    seeds = list(range(generation.seed, generation.seed + generation.seeds))
    batch = conditioning.repeated(len(seeds), cond)
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    with torch.inference_mode():
        output = pipe(num_inference_steps=generation.steps, guidance_scale=guidance_scale(pipe, generation),
                      generator=generators, output_type="pt", **pipeline_kwargs(batch),
                      **pipeline_call_kwargs(pipe, GenerationSettings(height=size[0], width=size[1])))
    return output.images.detach().to("cpu", torch.float32).clamp(0, 1)


# --------------------------------------------------------------------------------------------- model checks

def _state_hash(module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


def text_fingerprint(pipe) -> dict[str, str]:
    """A hash per tokenizer (vocabulary and merges) and per text encoder (config without paths, and weights)."""
    prints = {}
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is not None:
            content = {"vocab": sorted(tokenizer.get_vocab().items()),
                       "merges": [list(m) for m in getattr(tokenizer, "bpe_ranks", {})],
                       "max_length": tokenizer.model_max_length}
            prints[name] = hashlib.sha256(json.dumps(content, default=str).encode()).hexdigest()
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            config = {k: v for k, v in encoder.config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
            prints[f"{name}_config"] = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
            prints[f"{name}_weights"] = _state_hash(encoder)
    return prints


TEXT_COMPONENTS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")


def text_side(source: str):
    """Only the tokenizers and text encoders of a local pipeline folder (for checking before the long work), or None
    for a hub id (then the check runs when the model is loaded)."""
    import types

    import transformers

    index_path = Path(source).expanduser() / "model_index.json"
    if not index_path.is_file():
        return None
    index = json.loads(index_path.read_text())
    parts = {}
    for name in TEXT_COMPONENTS:
        entry = index.get(name)
        if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            continue
        cls = getattr(transformers, entry[1], None)
        if cls is None:
            return None
        kwargs = {} if name.startswith("tokenizer") else {"use_safetensors": True}
        try:
            parts[name] = cls.from_pretrained(str(index_path.parent), subfolder=name, **kwargs)
        except Exception as exc:  # transformers raises many types; all mean "cannot read this component"
            raise MemPruneError(f"Could not load the {name} of '{source}': {str(exc).splitlines()[0]}") from exc
    return types.SimpleNamespace(**parts)


def check_same_text_side(base: dict[str, str], edited: dict[str, str], folder: str) -> None:
    for key in sorted(set(base) | set(edited)):
        if base.get(key) != edited.get(key):
            part = key.replace("_config", " configuration").replace("_weights", " weights")
            raise MemPruneError(f"Edited model '{folder}' has another {part} than --model: the attack perturbs the base "
                                "model's text embeddings, so both must share the tokenizer and text encoder.")


# --------------------------------------------------------------------------------------------- threshold

def read_threshold(folder: str | Path, settings: AttackRunSettings) -> tuple[float, dict]:
    """The copy threshold of an evaluate output folder, refused when its similarity backend is not this run's."""
    folder = Path(folder)
    metrics_path = folder / "metrics.csv"
    if not metrics_path.is_file():
        raise MemPruneError(f"--threshold-from '{folder}' has no metrics.csv: give an output folder of memprune evaluate.")
    metrics = pd.read_csv(metrics_path)
    rows = metrics[metrics.metric == "copy_threshold"] if "metric" in metrics else metrics.iloc[0:0]
    if rows.empty:
        raise MemPruneError(f"'{metrics_path}' has no copy_threshold row: give an output folder of memprune evaluate.")
    run = json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() else {}
    theirs = run.get("settings", {})
    if theirs and (theirs.get("sscd") is not None) != (settings.sscd is not None) or (
            theirs and settings.sscd is None and theirs.get("similarity") != settings.similarity):
        raise MemPruneError(f"The evaluate run in '{folder}' used another similarity backend "
                            f"({theirs.get('sscd') or theirs.get('similarity')}): use the same --similarity/--sscd.")
    value = float(rows.value.iloc[0])
    return value, {"value": value, "source": str(metrics_path), "description": f"copy_threshold of '{metrics_path}'"}


def calibrate(pipe, backend, control: PromptList, pool: torch.Tensor, settings: AttackRunSettings, size,
              progress: bool) -> tuple[float, dict]:
    """evaluate's threshold: percentile of the unedited control generations' similarity to their nearest training image."""
    from .evaluate import calibrate_threshold
    from .generate import generate

    images = [image.detach().to("cpu", torch.float32).clamp(0, 1) for _, _, image in generate(
        pipe, control.prompts, settings.generation, output_type="pt", progress=progress, desc="calibration")]
    nearest = backend.matrix(backend.features(torch.stack(images)), backend.features(pool)).max(dim=1).values.numpy()
    value = calibrate_threshold(nearest, settings.threshold_percentile)
    return value, {
        "value": value, "percentile": settings.threshold_percentile, "generations": len(nearest),
        "description": f"{settings.threshold_percentile:g}th percentile of the similarity of {len(nearest)} unedited "
                       f"generations of '{control.source}' to their nearest of {len(pool)} known training images "
                       f"(seeds {settings.generation.seed}..{settings.generation.seed + settings.generation.seeds - 1}, "
                       f"{settings.generation.steps} steps); backend {backend.name}",
    }


# --------------------------------------------------------------------------------------------- run

@dataclass
class AttackRun:
    metrics: pd.DataFrame
    per_prompt: pd.DataFrame
    generations: pd.DataFrame
    threshold: float
    threshold_info: dict
    backend: str
    notes: list[str]
    timings: dict[str, float]


def select_prompts(settings: AttackRunSettings) -> PromptList:
    """The memorized prompts to attack: those with a training image, minus --exclude-prompts, the first --num-prompts."""
    prompts = read_prompts(settings.prompts)
    if not prompts.images or not any(prompts.images):
        raise MemPruneError(f"Prompt file '{settings.prompts}' has no image column: the attack needs each memorized "
                            "prompt's training image.")
    keep = [i for i, image in enumerate(prompts.images) if image]
    if settings.exclude_prompts is not None:
        used = set(read_prompts(settings.exclude_prompts).prompts)
        held_out = [i for i in keep if prompts.prompts[i] not in used]
        if len(held_out) == len(keep) and not used & set(prompts.prompts):
            raise MemPruneError(f"None of the captions in '{settings.exclude_prompts}' is a prompt of '{settings.prompts}': "
                                "was it written by locate on another memorized file?")
        keep = held_out
    if not keep:
        raise MemPruneError(f"No prompt of '{settings.prompts}' is left to attack (all excluded or without an image).")
    keep = keep[: settings.num_prompts] if settings.num_prompts else keep
    for i in keep:
        if not Path(prompts.images[i]).is_file():
            raise MemPruneError(f"Prompt file '{settings.prompts}' row {i + 1}: training image '{prompts.images[i]}' "
                                "does not exist.")
    return prompts.subset(keep)


def _attack_model(name, pipe, prompts: PromptList, training: list[torch.Tensor], train_features, backend, threshold,
                  settings: AttackRunSettings, size, progress: bool):
    from .evaluate import memorization_rate

    per_prompt, generations = [], []
    seeds = list(range(settings.generation.seed, settings.generation.seed + settings.generation.seeds))
    for i in tqdm(range(len(prompts)), desc=f"attack {name}", disable=not progress, leave=False):
        prompt = prompts.prompts[i]
        with torch.no_grad():
            conditioning = encode(pipe, [prompt], None, size)
        result = attack_prompt(pipe, prompt, training[i], settings.attack, conditioning)
        row = {"model": name, "prompt_index": i, "caption": prompt, "image": prompts.images[i],
               "denoising_loss": result.loss_before, "denoising_loss_attacked": result.loss_after,
               "perturbation_norm_relative": result.relative_norm, "attack_seconds": result.seconds}
        for attacked, cond in ((False, conditioning.cond), (True, conditioning.cond + result.delta.to(conditioning.cond))):
            images = generate_from_embeddings(pipe, conditioning, cond, settings.generation, size)
            feats = backend.features(images)
            similarity = backend.paired(feats, train_features[i][None].expand_as(feats)).double().numpy()
            suffix = "_attacked" if attacked else ""
            row[f"copy_similarity{suffix}"] = float(similarity.mean())
            row[f"memorization_rate{suffix}"] = memorization_rate(similarity, threshold)
            for seed, value in zip(seeds, similarity):
                generations.append({"model": name, "prompt_index": i, "caption": prompt, "seed": seed,
                                    "attacked": attacked, "copy_similarity": float(value),
                                    "is_copy": bool(value > threshold)})
        per_prompt.append(row)
    return per_prompt, generations


def _metrics(per_prompt: pd.DataFrame, generations: pd.DataFrame, settings: AttackRunSettings, threshold: float,
             models: list[str], calibrated_on: str) -> pd.DataFrame:
    from .evaluate import memorization_rate

    rows = [("unedited", calibrated_on, "copy_threshold", threshold)]
    group = settings.group
    for model in models:
        prompts = per_prompt[per_prompt.model == model]
        gens = generations[generations.model == model]
        add = lambda metric, value: rows.append((model, group, metric, float(value)))  # noqa: E731
        add("n_prompts", len(prompts))
        add("n_generations", len(gens) // 2)
        for attacked, suffix in ((False, ""), (True, "_attacked")):
            values = gens[gens.attacked == attacked].copy_similarity.to_numpy()
            add(f"memorization_rate{suffix}", memorization_rate(values, threshold))
            add(f"copy_similarity{suffix}", values.mean())
        add("denoising_loss", prompts.denoising_loss.mean())
        add("denoising_loss_attacked", prompts.denoising_loss_attacked.mean())
        add("perturbation_norm_relative", prompts.perturbation_norm_relative.mean())
        add("attack_seconds_per_prompt", prompts.attack_seconds.mean())
    return pd.DataFrame(rows, columns=["model", "group", "metric", "value"])


def attack(settings: AttackRunSettings, device: str = "auto", dtype=None, progress: bool = True,
           log: Callable[[str], None] | None = None) -> AttackRun:
    """Attack the unedited model and every edited model (module docstring); models are loaded one at a time."""
    from .evaluate import check_edited
    from .models import load_pipeline, resolve_device
    from .similarity import load_image, make_backend

    log = log or (lambda message: None)
    settings = settings.with_defaults()
    notes, timings = [], {}
    edited = settings.edited_models()
    for folder in edited.values():
        notes.append(check_edited(settings.model, folder))
    prompts = select_prompts(settings)
    backend = make_backend(settings.similarity, settings.sscd)
    log(f"Similarity backend: {backend.description}")
    target = resolve_device(device)

    tic = time.perf_counter()
    pipe = load_pipeline(settings.model, target, dtype)
    if not uses_cfg(pipe, settings.generation):
        notes.append("No classifier-free guidance (guidance scale <= 1): generations use the conditional branch only.")
    size = default_size(pipe)
    training = [load_image(path, size) for path in prompts.images]
    train_features = backend.features(torch.stack(training))
    base_print = text_fingerprint(pipe)
    for folder in edited.values():  # refuse a foreign text side before minutes of attacking
        components = text_side(folder)
        if components is not None:
            check_same_text_side(base_print, text_fingerprint(components), folder)
    timings["load_unedited"] = round(time.perf_counter() - tic, 3)

    calibrated_on = settings.group  # a given threshold is filed under the attacked group
    if settings.threshold is not None:
        threshold, info = settings.threshold, {"value": settings.threshold, "description": "given with --threshold"}
    elif settings.threshold_from is not None:
        threshold, info = read_threshold(settings.threshold_from, settings)
    else:
        control = read_prompts(settings.control)
        pool_paths = list(dict.fromkeys(p for p in (read_prompts(settings.prompts).images or []) + (control.images or []) if p))
        if not pool_paths:
            raise MemPruneError(f"No training images in '{settings.prompts}' or '{settings.control}' to calibrate the "
                                "copy threshold on: give --threshold.")
        pool = torch.stack([load_image(path, size) for path in pool_paths])
        tic = time.perf_counter()
        threshold, info = calibrate(pipe, backend, control, pool, settings, size, progress)
        timings["calibration"] = round(time.perf_counter() - tic, 3)
        calibrated_on = "same_style_control"  # --control is the same-style role of evaluate
    info["calibrated_on"] = calibrated_on
    log(f"Copy threshold: {threshold:.4f} ({info['description']}).")

    per_prompt, generations = [], []
    for name in ["unedited", *edited]:
        if name != "unedited":
            tic = time.perf_counter()
            del pipe
            pipe = load_pipeline(edited[name], target, dtype)
            check_same_text_side(base_print, text_fingerprint(pipe), edited[name])
            timings[f"load_{name}"] = round(time.perf_counter() - tic, 3)
        tic = time.perf_counter()
        rows, gens = _attack_model(name, pipe, prompts, training, train_features, backend, threshold, settings, size,
                                   progress)
        timings[f"attack_{name}"] = round(time.perf_counter() - tic, 3)
        per_prompt += rows
        generations += gens
        log(f"{name}: memorization {np.mean([r['memorization_rate'] for r in rows]):.1%} -> "
            f"{np.mean([r['memorization_rate_attacked'] for r in rows]):.1%} under attack "
            f"({timings[f'attack_{name}']:.0f} s).")
    per_prompt, generations = pd.DataFrame(per_prompt), pd.DataFrame(generations)
    metrics = _metrics(per_prompt, generations, settings, threshold, ["unedited", *edited], calibrated_on)
    return AttackRun(metrics, per_prompt, generations, threshold, info, backend.description, notes, timings)


def attack_to_folder(settings: AttackRunSettings, out, overwrite: bool = False, device: str = "auto", dtype=None,
                     progress: bool = True, log: Callable[[str], None] | None = None) -> str:
    """The `memprune attack` command as a function: metrics.csv, per_prompt.csv, generations.csv, run.json."""
    from .runinfo import atomic_output_dir, check_output_dir, write_run_json

    settings = settings.with_defaults()
    protected = [p for p in (settings.model, *settings.edited) if p and Path(p).exists()]
    check_output_dir(out, overwrite, protected)
    result = attack(settings, device=device, dtype=dtype, progress=progress, log=log)
    with atomic_output_dir(out, overwrite, protected) as staging:
        result.metrics.to_csv(staging / "metrics.csv", index=False)
        result.per_prompt.to_csv(staging / "per_prompt.csv", index=False)
        result.generations.to_csv(staging / "generations.csv", index=False)
        inputs = {"prompts": settings.prompts, "exclude_prompts": settings.exclude_prompts, "control": settings.control,
                  "sscd": settings.sscd}
        write_run_json(staging, settings, inputs, result.timings, similarity_backend=result.backend,
                       copy_threshold=result.threshold_info, notes=result.notes,
                       models={"unedited": settings.model, **settings.edited_models()})
    table = result.metrics[result.metrics.metric.isin(
        ["memorization_rate", "memorization_rate_attacked", "copy_similarity", "copy_similarity_attacked"])]
    lines = [f"Similarity backend: {result.backend}",
             f"Copy threshold: {result.threshold:.4f} ({result.threshold_info['description']}).",
             *[f"Note: {note}" for note in result.notes],
             table.pivot_table(index="model", columns="metric", values="value", sort=False).round(4).to_string(),
             f"Metrics: {Path(out) / 'metrics.csv'}; per prompt: {Path(out) / 'per_prompt.csv'}"]
    return "\n".join(lines)
