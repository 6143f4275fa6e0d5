"""Measure what the testbed must show: memorization of the memorized captions (and not of the
same-style control), and utility on general captions.

Memorization: for each caption and seed, SSIM (pixel space, 32×32, Gaussian window) between the
generation and the caption's training image. A generation *copies* when its SSIM exceeds a
threshold calibrated on control generations against their nearest training image (any emoji the
model was trained on): a quantile of that distribution, computed on half of the control captions
and checked on the other half. SSIM is also reported relative to the VAE reconstruction ceiling
(the best any generation can do through this VAE).

Utility: the attribute classifier (`attributes.py`) reads shape / colour / background / size off
generations of held-out general captions; diversity is the mean pairwise pixel distance between
seeds of one caption, next to the same number for real renders of that caption.

    python -m memprune.testbed.measure DIR [--seeds 4] [--steps 50] [--json out.json]
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from PIL import Image

from .imagesim import nearest_ssim, ssim, vae_reconstruct

# --------------------------------------------------------------------------- generation


@torch.no_grad()
def generate(pipe, captions: list[str], seeds: list[int], steps: int = 50, guidance_scale: float = 7.5,
             batch_size: int = 32, progress: bool = False) -> np.ndarray:
    """uint8 images (len(captions)·len(seeds))×32×32×3, ordered caption-major.

    One generator per image, seeded by the seed alone, so an image does not depend on batching
    and seed s of two captions starts from the same noise."""
    jobs = [(c, s) for c in captions for s in seeds]
    out = []
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i : i + batch_size]
        gens = [torch.Generator().manual_seed(s) for _, s in chunk]
        res = pipe([c for c, _ in chunk], num_inference_steps=steps, guidance_scale=guidance_scale,
                   generator=gens, output_type="np")
        out.append((np.clip(res.images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- testbed folder


def load_images(root: str, rels) -> np.ndarray:
    return np.stack([np.asarray(Image.open(os.path.join(root, r)).convert("RGB")) for r in rels])


def training_emoji_images(root: str) -> np.ndarray:
    """Every emoji image the model was trained on (memorized + control + pool), rebuilt from the
    seed in testbed_config.json (pool images are not stored in the folder)."""
    from .data import DataConfig, build_data

    meta = json.load(open(os.path.join(root, "testbed_config.json")))
    dcfg = dict(meta["config"]["data"])
    dcfg["seed"] = meta["config"]["seed"]
    dcfg["images_per_general_caption"] = 0  # general images not needed here
    data = build_data(DataConfig(**dcfg))
    return np.concatenate([data.memorized_images, data.control_images, data.pool_images])


@dataclass
class MemorizationResult:
    seeds: list[int]
    memorized_ssim: np.ndarray  # prompts × seeds, to the caption's own training image
    control_ssim: np.ndarray  # prompts × seeds, to the caption's own training image
    control_nearest: np.ndarray  # prompts × seeds, to the nearest training emoji
    vae_ceiling_memorized: np.ndarray  # per prompt: SSIM of the VAE reconstruction
    threshold: float
    quantile: float
    calibration_prompts: list[int]
    check_prompts: list[int]

    def summary(self) -> dict:
        cal = self.control_nearest[self.calibration_prompts]
        chk_own = self.control_ssim[self.check_prompts]
        chk_near = self.control_nearest[self.check_prompts]
        ceil = float(self.vae_ceiling_memorized.mean())
        return {
            "seeds": self.seeds,
            "threshold": self.threshold,
            "threshold_quantile": self.quantile,
            "memorized_mean_ssim": float(self.memorized_ssim.mean()),
            "memorized_median_ssim": float(np.median(self.memorized_ssim)),
            "vae_ceiling_mean_ssim": ceil,
            "memorized_mean_ssim_rel_ceiling": float(self.memorized_ssim.mean() / ceil),
            "memorized_copy_rate": float((self.memorized_ssim > self.threshold).mean()),
            "memorized_prompts_copied_majority": int(((self.memorized_ssim > self.threshold).mean(1) > 0.5).sum()),
            "n_memorized_prompts": int(self.memorized_ssim.shape[0]),
            "memorized_copy_rate_at_0.5": float((self.memorized_ssim > 0.5).mean()),
            "control_mean_ssim_own": float(self.control_ssim.mean()),
            "control_mean_ssim_nearest": float(self.control_nearest.mean()),
            "control_calibration_mean_nearest": float(cal.mean()),
            "control_copy_rate_own_heldout_half": float((chk_own > self.threshold).mean()),
            "control_copy_rate_nearest_heldout_half": float((chk_near > self.threshold).mean()),
            "control_copy_rate_own_all": float((self.control_ssim > self.threshold).mean()),
        }


def measure_memorization(pipe, root: str, seeds=(0, 1, 2, 3), steps: int = 50, guidance_scale: float = 7.5,
                         quantile: float = 0.95, max_prompts: int | None = None,
                         train_emoji: np.ndarray | None = None) -> MemorizationResult:
    mem = pd.read_csv(os.path.join(root, "captions", "memorized.csv"))
    ctl = pd.read_csv(os.path.join(root, "captions", "non_memorized_same_style.csv"))
    if max_prompts:
        mem, ctl = mem.iloc[:max_prompts], ctl.iloc[:max_prompts]
    seeds = list(seeds)
    k = len(seeds)
    mem_truth = load_images(root, mem["image"])
    ctl_truth = load_images(root, ctl["image"])
    g_mem = generate(pipe, list(mem["caption"]), seeds, steps, guidance_scale)
    g_ctl = generate(pipe, list(ctl["caption"]), seeds, steps, guidance_scale)
    s_mem = ssim(g_mem, np.repeat(mem_truth, k, 0)).view(-1, k).numpy()
    s_ctl = ssim(g_ctl, np.repeat(ctl_truth, k, 0)).view(-1, k).numpy()
    refs = train_emoji if train_emoji is not None else training_emoji_images(root)
    nearest, _ = nearest_ssim(g_ctl, refs)
    near = nearest.view(-1, k).numpy()
    ceiling = ssim(vae_reconstruct(pipe.vae, mem_truth), mem_truth).numpy()
    # Calibrate on even-indexed control prompts, check on odd ones (no threshold sees its test set).
    cal = list(range(0, len(ctl), 2))
    chk = list(range(1, len(ctl), 2))
    thr = float(np.quantile(near[cal], quantile))
    return MemorizationResult(seeds, s_mem, s_ctl, near, ceiling, thr, quantile, cal, chk)


def measure_utility(pipe, root: str, classifier=None, seeds=(0, 1, 2, 3), steps: int = 50,
                    guidance_scale: float = 7.5, which: str = "general_heldout", max_prompts: int | None = None,
                    classifier_cache: str | None = None) -> dict:
    """Attribute accuracy and diversity of generations for the general captions."""
    from .attributes import ATTRIBUTES, load_classifier, train_attribute_classifier
    from .data import COLOURS, ShapeSpec, render_shape

    clf = classifier or (
        train_attribute_classifier(cache=classifier_cache) if classifier_cache else load_classifier(root)
    )
    table = pd.read_csv(os.path.join(root, "captions", f"{which}.csv"))
    if max_prompts:
        table = table.iloc[:max_prompts]
    seeds = list(seeds)
    k = len(seeds)
    gens = generate(pipe, list(table["caption"]), seeds, steps, guidance_scale)
    pred = clf.predict(gens)
    res: dict = {"captions": which, "n_prompts": len(table), "seeds": seeds}
    for a in ATTRIBUTES:
        truth = np.repeat(table[a].to_numpy(), k)
        res[f"acc_{a}"] = float((pred[a] == truth).mean())
    all_ok = np.ones(len(gens), bool)
    for a in ATTRIBUTES:
        all_ok &= pred[a] == np.repeat(table[a].to_numpy(), k)
    res["acc_all_attributes"] = float(all_ok.mean())
    res["acc_mean"] = float(np.mean([res[f"acc_{a}"] for a in ATTRIBUTES]))
    # Diversity: mean pairwise RMS pixel distance across seeds of one caption; the same for real
    # renders of the caption gives the scale (a copy machine would score ~0).
    x = gens.reshape(len(table), k, -1).astype(np.float32) / 255
    rng = np.random.default_rng(0)
    real = np.stack([
        np.stack([np.asarray(render_shape(ShapeSpec(r.shape, r.colour, r.background, r.size), rng)) for _ in range(k)])
        for r in table.itertuples()
    ]).reshape(len(table), k, -1).astype(np.float32) / 255

    def pairwise(v):
        d = np.sqrt(((v[:, :, None] - v[:, None, :]) ** 2).mean(-1))
        iu = np.triu_indices(k, 1)
        return float(d[:, iu[0], iu[1]].mean())

    res["diversity_generated"] = pairwise(x)
    res["diversity_real"] = pairwise(real)
    res["real_acc_check"] = float(
        np.mean(
            [
                (
                    clf.predict((real.reshape(-1, 32, 32, 3) * 255).round().astype(np.uint8))[a]
                    == np.repeat(table[a].to_numpy(), k)
                ).mean()
                for a in ATTRIBUTES
            ]
        )
    )
    del COLOURS
    return res


def render_measurements(res: dict, command: str) -> str:
    """Markdown of a measurement run (the MODEL_CARD.md "Measurements" section)."""
    m = res["memorization"]
    lines = [
        "## Measurements",
        "",
        f"Command: `{command}` ({res.get('seconds', 0) / 60:.0f} min on {res.get('threads', 1)} CPU thread(s)). "
        "Sampler: DDIM "
        f"{res['steps']} steps, guidance {res['guidance']}, seeds {m['seeds']}; SSIM on 32×32 RGB "
        "(Gaussian window 11, σ 1.5).",
        "",
        "### 1. Memorization",
        "",
        f"Copy threshold: SSIM > **{m['threshold']:.3f}** = the {m['threshold_quantile']:.0%} quantile of the SSIM "
        "between "
        "generations of the even-indexed same-style control captions and their *nearest* training emoji "
        "(memorized, control and pool); the odd-indexed control captions are the held-out check.",
        "",
        "| | value |",
        "|---|---|",
        f"| memorized generations copying their training image | **{m['memorized_copy_rate']:.1%}** "
        f"({m['memorized_prompts_copied_majority']}/{m['n_memorized_prompts']} prompts copied in most seeds) |",
        f"| memorized: mean / median SSIM to the training image | {m['memorized_mean_ssim']:.3f} / "
        f"{m['memorized_median_ssim']:.3f} |",
        f"| VAE reconstruction ceiling (mean SSIM of encode→decode) | {m['vae_ceiling_mean_ssim']:.3f} |",
        f"| memorized mean SSIM relative to the ceiling | {m['memorized_mean_ssim_rel_ceiling']:.1%} |",
        f"| memorized generations above SSIM 0.5 | {m['memorized_copy_rate_at_0.5']:.1%} |",
        f"| control (held-out half) copying its own training image | "
        f"**{m['control_copy_rate_own_heldout_half']:.1%}** |",
        f"| control (held-out half) above threshold vs nearest training emoji | "
        f"{m['control_copy_rate_nearest_heldout_half']:.1%} |",
        f"| control: mean SSIM to own / nearest training image | {m['control_mean_ssim_own']:.3f} / "
        f"{m['control_mean_ssim_nearest']:.3f} |",
        "",
    ]
    if "utility" in res:
        u = res["utility"]
        lines += [
            "### 2. Utility (general captions never seen in training)",
            "",
            f"Attribute classifier (`memprune.testbed.attributes`, tiny CNN trained on fresh procedural renders) on "
            f"{u['n_prompts']} held-out general captions × {len(u['seeds'])} seeds:",
            "",
            "| shape | colour | background | size | mean | all four right | classifier on real renders |",
            "|---|---|---|---|---|---|---|",
            f"| {u['acc_shape']:.1%} | {u['acc_colour']:.1%} | {u['acc_background']:.1%} | {u['acc_size']:.1%} | "
            f"**{u['acc_mean']:.1%}** | {u['acc_all_attributes']:.1%} | {u['real_acc_check']:.1%} |",
            "",
            f"Diversity (mean pairwise RMS pixel distance between seeds of one caption): generated "
            f"{u['diversity_generated']:.3f}, real renders of the same captions {u['diversity_real']:.3f}.",
            "",
        ]
    return "\n".join(lines)


def write_card(root: str, res: dict, command: str) -> None:
    """Rewrite MODEL_CARD.md of `root` with these measurements."""
    from .config import config_from_dict
    from .data import build_data
    from .model_card import HISTORY, render_model_card

    meta = json.load(open(os.path.join(root, "testbed_config.json")))
    cfg = config_from_dict(meta["config"])
    data = build_data(dataclasses.replace(cfg.data, seed=cfg.seed, images_per_general_caption=1))
    pipe = load_pipeline(root)
    card = render_model_card(cfg, data, pipe, meta.get("train_seconds"), render_measurements(res, command), HISTORY,
                             trained_on=meta.get("trained_on"))
    with open(os.path.join(root, "MODEL_CARD.md"), "w") as f:
        f.write(card)


def load_pipeline(root: str, unet_snapshot: str | None = None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(root)
    if unet_snapshot:
        from safetensors.torch import load_file

        pipe.unet.load_state_dict(load_file(unet_snapshot))
    return quiet(pipe)


def main(argv=None) -> None:
    import argparse
    import time

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root")
    ap.add_argument("--unet", default=None, help="UNet snapshot (.safetensors) to swap in")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--max-prompts", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-utility", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--classifier-cache", default=None, help="file caching the attribute classifier")
    ap.add_argument("--write-card", action="store_true", help="put the results into ROOT/MODEL_CARD.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    pipe = load_pipeline(args.root, args.unet)
    seeds = list(range(args.seeds))
    m = measure_memorization(pipe, args.root, seeds, args.steps, args.guidance, max_prompts=args.max_prompts)
    out = {"memorization": m.summary(), "unet": args.unet, "steps": args.steps, "guidance": args.guidance,
           "threads": args.threads}
    print(json.dumps(out["memorization"], indent=1), flush=True)
    if not args.skip_utility:
        out["utility"] = measure_utility(pipe, args.root, seeds=seeds, steps=args.steps, guidance_scale=args.guidance,
                                         max_prompts=args.max_prompts, classifier_cache=args.classifier_cache)
        print(json.dumps(out["utility"], indent=1), flush=True)
    out["seconds"] = time.time() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if args.write_card:
        import sys

        write_card(
            args.root, out, "python -m memprune.testbed.measure " + " ".join(sys.argv[1:] if argv is None else argv)
        )


if __name__ == "__main__":
    main()
