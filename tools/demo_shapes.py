"""The synthetic shapes data set of the built-in demo model, and a plain-numpy classifier for it.

Prompt grammar (users and tests rely on it): ``"a {color} {shape} on a {color} background"`` with
colors red, green, blue, yellow, white, black (foreground != background) and shapes circle, square
(axis-aligned), triangle (upright: apex at the top): 6 x 5 x 3 = 90 prompts.

    draw(rng, "red", "circle", "blue")      -> (64, 64, 3) uint8 image
    classify(image)                          -> ("red", "circle", "blue"); None for a part it cannot tell
    prompt_of("red", "circle", "blue")       -> "a red circle on a blue background"

Used by tools/train_demo_model.py (training data), by the tests (semantic test of the shipped model)
and by tools/demo_semantic_score.py (the recorded figures).
"""

from __future__ import annotations

import itertools
import re

import numpy as np

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
SIZE = 64
_SUPERSAMPLE = 4
_PROMPT = re.compile(r"^an? (\w+) (\w+) on an? (\w+) background$")


def prompt_of(fg: str, shape: str, bg: str) -> str:
    return f"a {fg} {shape} on a {bg} background"


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    m = _PROMPT.match(prompt.strip().lower())
    if not m or m[1] not in COLORS or m[2] not in SHAPES or m[3] not in COLORS or m[1] == m[3]:
        raise ValueError(f"not a demo prompt: {prompt!r}")
    return m[1], m[2], m[3]


def all_triples() -> list[tuple[str, str, str]]:
    """All 90 (foreground, shape, background) combinations, in a fixed order."""
    return [(fg, shape, bg) for fg, shape, bg in itertools.product(COLORS, SHAPES, COLORS) if fg != bg]


def random_triple(rng: np.random.Generator) -> tuple[str, str, str]:
    triples = all_triples()
    return triples[rng.integers(len(triples))]


def _jitter(rng: np.random.Generator, rgb) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in rgb)


def draw(rng: np.random.Generator, fg: str, shape: str, bg: str, size: int = SIZE) -> np.ndarray:
    """One anti-aliased image: a ``fg`` shape of random size (30-70 % of the side) and position (fully
    inside) on a ``bg`` background, both colors jittered a little."""
    from PIL import Image, ImageDraw

    big = size * _SUPERSAMPLE
    side = rng.uniform(0.3, 0.7) * big
    x0 = rng.uniform(0, big - side)
    y0 = rng.uniform(0, big - side)
    img = Image.new("RGB", (big, big), _jitter(rng, COLORS[bg]))
    d = ImageDraw.Draw(img)
    color = _jitter(rng, COLORS[fg])
    box = (x0, y0, x0 + side, y0 + side)
    if shape == "circle":
        d.ellipse(box, fill=color)
    elif shape == "square":
        d.rectangle(box, fill=color)
    elif shape == "triangle":
        d.polygon([(x0 + side / 2, y0), (x0 + side, y0 + side), (x0, y0 + side)], fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(img.resize((size, size), Image.BOX), dtype=np.uint8)


# ---------------------------------------------------------------------------------------- classifier

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32)


def _labels(image: np.ndarray) -> np.ndarray:
    """Each pixel's nearest palette color (index), (H, W)."""
    px = np.asarray(image, dtype=np.float32)[..., :3]
    dist = ((px[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    return dist.argmin(-1)


def shape_of(mask: np.ndarray) -> str | None:
    """circle / square / triangle from a blob's geometry, read off the four corners of its bounding
    box (squares a fifth of the side): a triangle (upright) has empty top corners and full bottom ones,
    a square four full corners (also when slightly rounded), a circle four nearly empty ones (about
    15 % each). How much of the box the blob fills (square 1, circle 0.79, triangle 0.5) must agree.
    None: no plausible blob."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 16:
        return None
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    h, w = y1 - y0, x1 - x0
    fill = len(ys) / float(h * w)
    if not 0.6 < h / w < 1.0 / 0.6 or fill < 0.35:
        return None
    box = mask[y0:y1, x0:x1]
    ch, cw = max(h // 5, 1), max(w // 5, 1)
    top = (box[:ch, :cw].mean() + box[:ch, -cw:].mean()) / 2
    bottom = (box[-ch:, :cw].mean() + box[-ch:, -cw:].mean()) / 2
    if top < 0.2 and bottom - top > 0.25:
        return "triangle"
    corners = (top + bottom) / 2
    if corners > 0.33 and fill > 0.75:
        return "square"
    if corners <= 0.33 and fill > 0.6:
        return "circle"
    return None


def classify(image) -> tuple[str | None, str | None, str | None]:
    """(foreground color, shape, background color) of an RGB image (array or PIL image): background =
    the most frequent palette color on the border, foreground = the most frequent other one, shape
    from the foreground blob (shape_of)."""
    labels = _labels(np.asarray(image))
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    bg = int(np.bincount(border, minlength=len(_PALETTE)).argmax())
    counts = np.bincount(labels.ravel(), minlength=len(_PALETTE))
    counts[bg] = 0
    if counts.max() == 0:
        return None, None, _PALETTE_NAMES[bg]
    fg = int(counts.argmax())
    return _PALETTE_NAMES[fg], shape_of(labels == fg), _PALETTE_NAMES[bg]
