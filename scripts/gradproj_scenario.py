"""Gradient projection as selective learning (issue 25 item 3), on a testbed model: three arms, same seeds and steps.

The paper ("Beyond Memorization: Gradient Projection Enables Selective Learning in Diffusion Models", arXiv
2512.11194) projects updates off a sensitive concept's text subspace *while the model learns data that contains
it*. Here the data is a mixture built from the testbed's own files (commands/defaults.py names them):

- learned: `--learned` general training captions (general_train.csv), each with an image rendered from its
  attributes (memprune.testbed.data.render_shape, seeded);
- protected: `--protect-count` same-style captions with their images (non_memorized_same_style.csv; each was seen
  once in the testbed's training, so the unedited model does not copy them), each repeated `--copies` times —
  duplication is what makes a model memorize.

Arms (memprune.commands.finetune, one call each, the same FinetuneSettings and seed):
- ``projected``: `finetune --method gradproj --data mixture.csv --protect protect.csv`;
- ``plain``: `finetune --method plain --data mixture.csv` (the positive control: it must memorize them);
- ``filtered``: `finetune --method plain --data filtered.csv` (the protected rows removed: the target level).

Measured on every arm and the unedited model: the protected captions' copy similarity (SSIM to their image) and
memorization rate on fresh seeds (from 1000), the copy threshold calibrated as evaluate does (95th percentile of the
unedited model's generations of other same-style captions to their nearest known image); with `--attack-steps` the
same under the embedding attack (memprune.attack.embedding); utility as the denoising loss (fixed t, ε draws) on
held-out general captions with rendered images (general_heldout.csv), and on the learned images. The paper's claim
reads as `1 − rate(projected) / rate(plain)` ≥ 0.92 at unchanged utility.

    python scripts/gradproj_scenario.py --out runs/gradproj_scenario
    python scripts/gradproj_scenario.py --out /tmp/gradproj_smoke --quick      # a 1-2 minute smoke run
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from memprune.attack.embedding import (
    AttackSettings,
    attack_prompt,
    denoising_loss,
    encode_image,
    generate_from_embeddings,
)
from memprune.commands.defaults import testbed_file
from memprune.commands.finetune import FinetuneInputs, finetune_to_folder
from memprune.conditioning import default_size, encode
from memprune.errors import MemPruneError
from memprune.evaluation.metrics import calibrate_threshold, memorization_rate
from memprune.finetune import FinetuneSettings
from memprune.generate import GenerationSettings
from memprune.models import DEFAULT_MODEL, load_pipeline
from memprune.prompts import read_prompts
from memprune.similarity import load_image, make_backend
from memprune.testbed.data import ShapeSpec, render_shape

QUICK = {"learned": 24, "protect_count": 3, "copies": 6, "steps": 15, "seeds": 1, "sample_steps": 10,
         "calibration": 6, "utility": 8}


def build_mixture(model: str, folder: Path, args) -> dict[str, Path]:
    """mixture.csv, filtered.csv, protect.csv and their images under `folder` (module docstring)."""
    rng = np.random.default_rng(args.seed)
    control = read_prompts(testbed_file(model, "control"))
    chosen = rng.choice(len(control), size=args.protect_count + args.calibration, replace=False)
    protected, calibration = chosen[:args.protect_count], chosen[args.protect_count:]
    general = pd.read_csv(testbed_file(model, "general_train"))
    general = general.iloc[sorted(rng.choice(len(general), size=min(args.learned, len(general)), replace=False))]
    (folder / "learned").mkdir(parents=True)
    (folder / "protected").mkdir()
    learned_rows = []
    for i, row in enumerate(general.itertuples()):
        spec = ShapeSpec(row.shape, row.colour, row.background, row.size)
        render_shape(spec, rng).save(folder / f"learned/{i}.png")
        learned_rows.append({"caption": spec.caption, "image": f"learned/{i}.png"})
    protected_rows = []
    for j, index in enumerate(protected):
        shutil.copyfile(control.image(int(index)), folder / f"protected/{j}.png")
        protected_rows.append({"caption": control.prompts[int(index)], "image": f"protected/{j}.png"})
    pd.DataFrame(learned_rows + protected_rows * args.copies).to_csv(folder / "mixture.csv", index=False)
    pd.DataFrame(learned_rows).to_csv(folder / "filtered.csv", index=False)
    pd.DataFrame(protected_rows).to_csv(folder / "protect.csv", index=False)
    pd.DataFrame([{"caption": control.prompts[int(i)], "image": control.image(int(i))} for i in calibration]
                 ).to_csv(folder / "calibration.csv", index=False)
    return {name: folder / f"{name}.csv" for name in ("mixture", "filtered", "protect", "calibration")}


def heldout_images(model: str, count: int, seed: int) -> tuple[list[str], list[torch.Tensor]]:
    """Held-out general captions with an image rendered from their attributes (utility)."""
    rng = np.random.default_rng(seed + 1)
    table = pd.read_csv(testbed_file(model, "general")).head(count)
    specs = [ShapeSpec(r.shape, r.colour, r.background, r.size) for r in table.itertuples()]
    pixels = [torch.from_numpy(np.asarray(render_shape(s, rng), dtype=np.float32) / 255).permute(2, 0, 1)
              for s in specs]
    return [s.caption for s in specs], pixels


def similarities(pipe, backend, prompts, images, generation, size, attack: AttackSettings | None) -> np.ndarray:
    """(prompts, seeds) copy similarity of each prompt's generations (from its attacked embedding with `attack`)."""
    rows = []
    for prompt, image in zip(prompts, images, strict=True):
        conditioning = encode(pipe, [prompt], None, size)
        cond = conditioning.cond
        if attack is not None:
            cond = cond + attack_prompt(pipe, prompt, image, attack, conditioning).delta.to(cond)
        feats = backend.features(generate_from_embeddings(pipe, conditioning, cond, generation, size))
        target = backend.features(image[None])
        rows.append(backend.paired(feats, target.expand_as(feats)).double().numpy())
    return np.stack(rows)


def utility(pipe, prompts: list[str], images: list[torch.Tensor], seed: int) -> float:
    """Mean denoising loss of the images under their captions, on fixed (t, ε) draws (4 per image)."""
    generator = torch.Generator().manual_seed(seed)
    size = default_size(pipe)
    losses = []
    with torch.no_grad():
        for prompt, image in zip(prompts, images, strict=True):
            x0 = encode_image(pipe, torch.nn.functional.interpolate(image[None], size=size, mode="bilinear")[0])
            t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (4,), generator=generator)
            noise = torch.randn((4, *x0.shape[1:]), generator=generator)
            conditioning = encode(pipe, [prompt], None, size)
            losses.append(float(denoising_loss(pipe, x0, conditioning.cond, conditioning, t, noise)))
    return float(np.mean(losses))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="a smoke run of 1-2 minutes on a CPU")
    parser.add_argument("--learned", type=int, default=256, help="general training images learned once each")
    parser.add_argument("--protect-count", type=int, default=10, help="same-style images to protect")
    parser.add_argument("--copies", type=int, default=20, help="times each protected image is in the mixture")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--params", choices=["kv", "unet"], default="kv")
    parser.add_argument("--seeds", type=int, default=4, help="fresh generation seeds per protected caption")
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--calibration", type=int, default=20, help="other same-style captions for the threshold")
    parser.add_argument("--utility", type=int, default=32, help="held-out general captions for utility")
    parser.add_argument("--attack-steps", type=int, default=0, help="also measure under the attack (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    torch.set_num_threads(1)
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists: choose another --out.")
    if testbed_file(args.model, "control") is None:
        raise SystemExit(f"{args.model} is not a memprune testbed: the scenario builds its mixture from one.")
    files = build_mixture(args.model, out / "mixture", args)
    settings = FinetuneSettings(steps=args.steps, lr=args.lr, seed=args.seed, params=args.params,
                                batch_size=args.batch_size, progress=True)
    arms = {"projected": ("gradproj", "mixture", files["protect"]), "plain": ("plain", "mixture", None),
            "filtered": ("plain", "filtered", None)}
    folders = {"unedited": args.model}
    for arm, (method, data, protect) in arms.items():
        arm_settings = FinetuneSettings(**{**vars(settings), "retain_images": str(files[data])})
        print(finetune_to_folder(args.model, method, out / arm, arm_settings,
                                 FinetuneInputs(protect=protect and str(protect), data_option="--data"),
                                 device="cpu", log=print))
        folders[arm] = str(out / arm)

    backend = make_backend("ssim")
    generation = GenerationSettings(steps=args.sample_steps, seeds=args.seeds, seed=1000)
    protect = read_prompts(files["protect"])
    calibration = read_prompts(files["calibration"])
    learned = pd.read_csv(files["filtered"]).head(args.utility)
    held_prompts, held_images = heldout_images(args.model, args.utility, args.seed)
    attack = AttackSettings(attack_steps=args.attack_steps, attack_seed=0) if args.attack_steps else None
    rows, threshold = [], None
    for name, folder in folders.items():
        pipe = load_pipeline(folder, "cpu")
        pipe.set_progress_bar_config(disable=True)
        size = default_size(pipe)
        images = [load_image(protect.image(i), size) for i in range(len(protect))]
        if threshold is None:  # unedited: evaluate's calibration on other same-style captions
            pool = torch.stack(images + [load_image(calibration.image(i), size) for i in range(len(calibration))])
            nearest = []
            for i in range(len(calibration)):
                conditioning = encode(pipe, [calibration.prompts[i]], None, size)
                feats = backend.features(generate_from_embeddings(pipe, conditioning, conditioning.cond, generation,
                                                                  size))
                nearest += backend.matrix(feats, backend.features(pool)).max(dim=1).values.tolist()
            threshold = calibrate_threshold(nearest, 95.0)
        plain_sims = similarities(pipe, backend, protect.prompts, images, generation, size, None)
        row = {"arm": name, "copy_similarity": plain_sims.mean(),
               "memorization_rate": memorization_rate(plain_sims.ravel(), threshold),
               "utility_heldout_loss": utility(pipe, held_prompts, held_images, args.seed),
               "learned_loss": utility(pipe, learned.caption.tolist(),
                                       [load_image(files["filtered"].parent / p) for p in learned.image], args.seed)}
        if attack is not None:
            attacked = similarities(pipe, backend, protect.prompts, images, generation, size, attack)
            row.update(copy_similarity_attacked=attacked.mean(),
                       memorization_rate_attacked=memorization_rate(attacked.ravel(), threshold))
        rows.append(row)
        print(row)
    table = pd.DataFrame(rows)
    table.to_csv(out / "scenario.csv", index=False)
    plain_rate = float(table.set_index("arm").loc["plain", "memorization_rate"])
    projected_rate = float(table.set_index("arm").loc["projected", "memorization_rate"])
    reduction = 1 - projected_rate / plain_rate if plain_rate > 0 else float("nan")
    (out / "scenario.json").write_text(json.dumps({"settings": vars(args), "copy_threshold": threshold,
                                                   "extraction_reduction_vs_plain": reduction}, indent=1))
    print(table.round(4).to_string(index=False))
    print(f"copy threshold {threshold:.4f}; extractions, projected vs plain: {reduction:.1%} fewer"
          + (" (the plain arm memorized nothing: no positive control, so this run cannot judge the projection)"
             if plain_rate == 0 else ""))


if __name__ == "__main__":
    try:
        main()
    except MemPruneError as error:
        raise SystemExit(str(error)) from None
