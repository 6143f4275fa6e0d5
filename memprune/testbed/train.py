"""Train the memorization testbed: VAE, then UNet (DDPM), then write a pipeline folder.

Reproducible from a seed: every batch is drawn from a generator seeded by (seed, step), so a
run resumed from a checkpoint sees exactly the batches an uninterrupted run would. The text
encoder is frozen, so caption embeddings and image latents are computed once up front and the
UNet is the only thing trained in the main loop (the CPU budget goes to UNet steps).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .config import TestbedConfig, config_to_dict
from .data import TestbedData, all_captions, build_data
from .export import write_testbed_folder
from .model import (
    assemble_pipeline,
    build_text_encoder,
    build_unet,
    build_vae,
    train_scheduler,
)
from .model_card import describe_device
from .tokenizer import train_clip_tokenizer

# --------------------------------------------------------------------------- helpers

def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 N×H×W×3 → float N×3×H×W in [-1, 1] (the VAE's input range)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _atomic_torch_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def lr_factor(step: int, cfg: TestbedConfig) -> float:
    """Linear warmup, constant, then cosine decay over the last `decay_fraction` of steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    start = int(cfg.steps * (1 - cfg.decay_fraction))
    if step < start:
        return 1.0
    t = (step - start) / max(cfg.steps - start, 1)
    return cfg.final_lr_fraction + (1 - cfg.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * t))


# --------------------------------------------------------------------------- stage 1: VAE

def train_vae(cfg: TestbedConfig, data: TestbedData, work_dir: str, progress: bool = True,
              device: str | torch.device = "cpu"):
    """Train the tiny AutoencoderKL on all training images; cached in work_dir/vae."""
    device = torch.device(device)
    vae_dir = os.path.join(work_dir, "vae")
    if os.path.exists(os.path.join(vae_dir, "config.json")):
        from diffusers import AutoencoderKL

        cached = AutoencoderKL.from_pretrained(vae_dir)
        # from_pretrained records the cache path as _name_or_path; rebuild so no local path reaches the shipped config.
        vae = AutoencoderKL.from_config({k: v for k, v in cached.config.items() if k != "_name_or_path"})
        vae.load_state_dict(cached.state_dict())
        return vae.eval().to(device)
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg.model.vae).to(device)
    emoji = to_tensor(np.concatenate([data.memorized_images, data.control_images, data.pool_images])).to(device)
    shapes = to_tensor(data.general_images).to(device)
    images = torch.cat([emoji, shapes])
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0, fused=device.type == "cuda")
    rng = np.random.default_rng([cfg.seed, 2])
    bar = tqdm(range(cfg.vae_steps), desc="vae", disable=not progress, mininterval=5)
    for step in bar:
        # Cosine lr over the short VAE run.
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps))
        # Half emoji, half shapes: emoji detail is what bounds how well a copy can be measured.
        n_e = cfg.vae_batch_size // 2
        x = torch.cat(
            [emoji[rng.integers(0, len(emoji), n_e)], shapes[rng.integers(0, len(shapes), cfg.vae_batch_size - n_e)]]
        )
        post = vae.encode(x).latent_dist
        # Decode the posterior mean: with a tiny KL weight the posterior noise would only slow
        # learning down (the encoder must first learn to shrink it); SD's VAE is near-deterministic too.
        rec = vae.decode(post.mean if cfg.vae_decode_mean else post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    # SD scales latents to unit variance; compute the factor from the training latents.
    with torch.no_grad():
        z = torch.cat([vae.encode(images[i : i + 512]).latent_dist.mean for i in range(0, len(images), 512)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    tmp = vae_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, vae_dir)
    return vae


# --------------------------------------------------------------------------- stage 2: UNet

@dataclass
class TrainingSet:
    """Pre-encoded latents (mean, std) and caption embeddings of every training image."""

    mean: dict[str, torch.Tensor]
    std: dict[str, torch.Tensor]
    caption_ids: dict[str, torch.Tensor]  # index into `embeddings` per image
    embeddings: torch.Tensor  # (n_captions + 1) × L × D; the last row is the empty caption

    def to(self, device) -> TrainingSet:
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return TrainingSet(move(self.mean), move(self.std), move(self.caption_ids), self.embeddings.to(device))

    def flat(self) -> tuple[dict[str, int], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every group in one table (offsets, mean, std, caption id): a batch is one index_select."""
        offsets, start = {}, 0
        for name, v in self.mean.items():
            offsets[name] = start
            start += len(v)
        # contiguous: VAE latents come out channels-last, which would change the UNet's conv kernels
        cat = lambda d: torch.cat([d[k] for k in self.mean]).contiguous()  # noqa: E731
        return offsets, cat(self.mean), cat(self.std), cat(self.caption_ids)


@torch.no_grad()
def encode_training_set(data: TestbedData, vae, tokenizer, text_encoder) -> TrainingSet:
    """Caption embeddings (on the text encoder's device) and latents (on the VAE's device)."""
    groups = {
        "memorized": (data.memorized_images, [e.caption for e in data.memorized]),
        "control": (data.control_images, [e.caption for e in data.control]),
        "pool": (data.pool_images, [e.caption for e in data.pool]),
        "general": (data.general_images, [data.general_train_specs[i].caption for i in data.general_spec_index]),
    }
    captions = sorted({c for _, caps in groups.values() for c in caps})
    index = {c: i for i, c in enumerate(captions)}
    emb = []
    for i in range(0, len(captions) + 1, 256):
        chunk = (captions + [""])[i : i + 256]
        ids = tokenizer(
            chunk, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        emb.append(text_encoder(ids)[0])
    embeddings = torch.cat(emb)
    mean, std, cap_ids = {}, {}, {}
    for name, (imgs, caps) in groups.items():
        x = to_tensor(imgs).to(vae.device)
        ms, ss = [], []
        for i in range(0, len(x), 512):
            d = vae.encode(x[i : i + 512]).latent_dist
            ms.append(d.mean)
            ss.append(d.std)
        mean[name] = torch.cat(ms) * vae.config.scaling_factor
        std[name] = torch.cat(ss) * vae.config.scaling_factor
        cap_ids[name] = torch.tensor([index[c] for c in caps])
    return TrainingSet(mean, std, cap_ids, embeddings)


def control_steps(cfg: TestbedConfig) -> np.ndarray:
    """The step at which each control image is shown (exactly once in the whole run)."""
    return _control_steps_cached(cfg.seed, cfg.steps, cfg.data.n_control)


@functools.lru_cache(maxsize=4)
def _control_steps_cached(seed: int, steps: int, n: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 3])
    return rng.choice(steps, size=n, replace=steps < n)


@functools.lru_cache(maxsize=8)
def _epoch_permutation(seed: int, group: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, 4, group, epoch]).permutation(n)


def batch_indices(step: int, cfg: TestbedConfig, sizes: dict[str, int]) -> list[tuple[str, int]]:
    """Which training images form batch `step` — a pure function of (seed, step).

    Memorized and pool images are taken round-robin through per-epoch permutations, so each is
    seen equally often; general images are drawn uniformly; control images at their own step."""
    b = cfg.batch_size
    out: list[tuple[str, int]] = []
    ctrl = _control_steps_cached(cfg.seed, cfg.steps, cfg.data.n_control)
    for i in np.nonzero(ctrl == step)[0]:
        out.append(("control", int(i)))
    first = {"memorized": cfg.first_memorized_step, "pool": 0}
    for name, share in (("memorized", cfg.memorized_share), ("pool", cfg.pool_share)):
        n = sizes[name]
        if n == 0 or step < first[name]:
            continue
        k_step = step - first[name]
        lo, hi = math.floor(k_step * b * share), math.floor((k_step + 1) * b * share)
        for k in range(lo, hi):
            epoch, pos = divmod(k, n)
            perm = _epoch_permutation(cfg.seed, 0 if name == "memorized" else 1, epoch, n)
            out.append((name, int(perm[pos])))
    rng = np.random.default_rng([cfg.seed, 5, step])
    for i in rng.integers(0, sizes["general"], max(b - len(out), 0)):
        out.append(("general", int(i)))
    return out[:b] if len(out) > b else out


def train_unet(cfg: TestbedConfig, ts: TrainingSet, work_dir: str, progress: bool = True, log=None,
               stop_at: int | None = None, device: str | torch.device = "cpu"):
    """DDPM training of the UNet, resumable from work_dir/unet_ckpt.pt.

    `stop_at` ends the run after that step with a checkpoint (returns None): time-sliced training.
    Noise, timesteps and batches are drawn on the CPU from (seed, step) whatever the device, so a
    GPU run sees the same batches as a CPU run (the arithmetic differs only in rounding)."""
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    unet = build_unet(cfg.model.unet, cfg.model.vae.latent_channels, cfg.model.text.hidden_size).to(device)
    sched = train_scheduler(cfg.model.scheduler)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    ckpt_path = os.path.join(work_dir, "unet_ckpt.pt")
    snap_dir = os.path.join(work_dir, "snapshots")
    os.makedirs(snap_dir, exist_ok=True)
    start = 0
    if os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, weights_only=False, map_location=device)
        unet.load_state_dict(ck["unet"])
        opt.load_state_dict(ck["opt"])
        start = ck["step"]
    ts = ts.to(device)
    sizes = {k: len(v) for k, v in ts.mean.items()}
    offsets, all_mean, all_std, all_caption = ts.flat()
    empty_id = len(ts.embeddings) - 1

    def save(step: int) -> None:
        _atomic_torch_save({"unet": unet.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt_path)
        if cfg.keep_snapshots:
            weights = {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
            save_file(weights, os.path.join(snap_dir, f"unet_step{step:06d}.safetensors"))

    unet.train()
    last_save = time.time()
    t0, done = time.time(), 0
    bar = tqdm(
        range(start, cfg.steps), initial=start, total=cfg.steps, desc="unet", disable=not progress, mininterval=10
    )
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(step, cfg)
        g_rng = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        items = batch_indices(step, cfg, sizes)
        rows = torch.tensor([offsets[n] + i for n, i in items], device=device)
        mean, std, cap = all_mean[rows], all_std[rows], all_caption[rows]
        drop = (torch.rand(len(items), generator=g_rng) < cfg.empty_caption_prob).to(device)
        cap = torch.where(drop, torch.full_like(cap, empty_id), cap)
        latents = mean + std * torch.randn(mean.shape, generator=g_rng).to(device)
        noise = torch.randn(latents.shape, generator=g_rng).to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(items),), generator=g_rng).to(device)
        noisy = sched.add_noise(latents, noise, t)
        target = sched.get_velocity(latents, noise, t) if sched.config.prediction_type == "v_prediction" else noise
        pred = unet(noisy, t, ts.embeddings[cap]).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        done += 1
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
        if log is not None and step % 100 == 0:
            el = time.time() - t0
            log(f"step {step} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"samples/s {done * cfg.batch_size / max(el, 1e-9):.1f}")
        if stop_at is not None and step + 1 >= stop_at and step + 1 < cfg.steps:
            save(step + 1)
            return None
        if time.time() - last_save > cfg.checkpoint_every_s:
            save(step + 1)
            last_save = time.time()
    if start < cfg.steps:
        save(cfg.steps)
    unet.eval()
    return unet


# --------------------------------------------------------------------------- stage 0 + all

def build_tokenizer_and_text_encoder(cfg: TestbedConfig, data: TestbedData):
    tokenizer = train_clip_tokenizer(all_captions(data), model_max_length=cfg.model.text.max_length)
    torch.manual_seed(cfg.seed + 7)  # the frozen random text encoder is part of the model
    text_encoder = build_text_encoder(cfg.model.text, tokenizer)
    return tokenizer, text_encoder


def train_testbed(config: TestbedConfig, out: str, work_dir: str | None = None, progress: bool = True,
                  log=None, overwrite: bool = False, stop_at: int | None = None,
                  device: str | torch.device = "cpu") -> str | None:
    """Train the whole testbed and write a complete folder at `out` (must not exist unless `overwrite`).

    `work_dir` keeps checkpoints (VAE, UNet + optimizer) so an interrupted run resumes where it
    stopped when called again with the same config and work_dir (`stop_at` stops after that UNet
    step on purpose and returns None). The folder is written to a
    temporary sibling and renamed, so `out` is either complete or absent."""

    torch.set_num_threads(config.threads)
    work_dir = work_dir or out + ".work"
    os.makedirs(work_dir, exist_ok=True)
    cfg_path = os.path.join(work_dir, "config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            if json.load(f) != json.loads(json.dumps(config_to_dict(config))):
                raise ValueError(f"{work_dir} holds checkpoints of a different configuration")
    else:
        with open(cfg_path, "w") as f:
            json.dump(config_to_dict(config), f, indent=1)
    t_start = time.time()
    data = build_data(dataclasses.replace(config.data, seed=config.seed))
    tokenizer, text_encoder = build_tokenizer_and_text_encoder(config, data)
    vae = train_vae(config, data, work_dir, progress, device)
    vae.eval().requires_grad_(False)
    ts = encode_training_set(data, vae, tokenizer, text_encoder)
    unet = train_unet(config, ts, work_dir, progress, log, stop_at, device)
    if unet is None:  # stopped early on request; rerun to resume
        return None
    unet, vae = unet.to("cpu"), vae.to("cpu")  # the folder is written from host memory
    pipe = assemble_pipeline(vae, text_encoder, tokenizer, unet, config.model.scheduler)
    write_testbed_folder(pipe, data, config, out, train_seconds=time.time() - t_start, overwrite=overwrite,
                         trained_on=describe_device(device, config.threads))
    return out


def load_unet_snapshot(pipe, path: str):
    """Swap a UNet snapshot (from work_dir/snapshots) into a pipeline, for measuring curves."""
    pipe.unet.load_state_dict(load_file(path))
    return pipe
