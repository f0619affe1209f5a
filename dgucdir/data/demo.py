"""The embedded demo dataset: real handwritten digits rendered in four visual domains.

No download: the digits are scikit-learn's bundled ``load_digits`` (1797 scans, 10 classes)
and the photo backgrounds are its bundled ``load_sample_images``. Each domain renders a
*disjoint*, class-stratified subset of the source digits, so cross-domain retrieval cannot
succeed by matching the same source scan. The result is written as image lists and packed by
the same ``dgucdir pack`` path users take for PACS or DomainNet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

DOMAINS = ("ink", "neon", "photo", "sketch")
SIZE = 64
# Bumped whenever the rendering changes: a demo folder rendered by another version is rebuilt.
RENDER_VERSION = 2


def _stroke_mask(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An 8x8 scan (0..16) -> a 64x64 stroke mask in [0, 1] with a random small affine jitter."""
    small = Image.fromarray((digit / 16.0 * 255).astype(np.uint8))
    big = small.resize((40, 40), Image.BICUBIC).filter(ImageFilter.GaussianBlur(1.0))
    canvas = Image.new("L", (SIZE, SIZE))
    canvas.paste(big, (12, 12))
    angle = rng.uniform(-15, 15)
    scale = rng.uniform(0.85, 1.15)
    dx, dy = rng.uniform(-5, 5, size=2)
    canvas = canvas.rotate(angle, resample=Image.BILINEAR, translate=(dx, dy))
    canvas = canvas.resize((int(SIZE * scale),) * 2, Image.BILINEAR)
    out = Image.new("L", (SIZE, SIZE))
    off = (SIZE - canvas.size[0]) // 2
    out.paste(canvas, (off, off))  # a negative offset crops, as wanted when scale > 1
    m = np.asarray(out, dtype=np.float32) / 255.0
    return np.clip((m - 0.15) / 0.6, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, std: float) -> np.ndarray:
    """Low-frequency (SIZE, SIZE, 1) variation: paper unevenness, without pixel grain.

    Per-pixel noise would be white in the spectrum and dominate the phase image, which keeps
    the phase of every frequency at unit weight.
    """
    coarse = rng.normal(0, std, (8, 8)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((SIZE, SIZE), Image.BICUBIC))[..., None]


def _blend(bg: np.ndarray, fg: np.ndarray, m: np.ndarray) -> Image.Image:
    img = bg * (1 - m[..., None]) + fg * m[..., None]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


# Style choices come from small palettes shared by many images: a domain differs from the others
# by its style, while one image differs from another of its domain mainly by its digit. (With a
# unique background or colour per image, instance discrimination learns those instead of shapes.)
INKS = np.array([[20, 25, 60], [15, 15, 15], [60, 20, 20]], np.float32)
NEON_HUES = (0.0, 0.15, 0.33, 0.55, 0.8)
PHOTO_SPOTS = 6
BOKEH = 2.5


def render_ink(m: np.ndarray, rng: np.random.Generator, photos: list[np.ndarray]) -> Image.Image:
    """Dark ink on slightly textured paper."""
    paper = np.array([245, 238, 220], np.float32) + _smooth_noise(rng, 6.0)
    return _blend(paper, INKS[rng.integers(len(INKS))], m)


def render_neon(m: np.ndarray, rng: np.random.Generator, photos: list[np.ndarray]) -> Image.Image:
    """Bright glowing strokes (one of a few hues) on a dark background."""
    hue = NEON_HUES[rng.integers(len(NEON_HUES))]
    color = np.array(Image.new("HSV", (1, 1), (int(hue * 255), 200, 255)).convert("RGB").getpixel((0, 0)), np.float32)
    glow = np.asarray(Image.fromarray((m * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(3)), np.float32) / 255
    bg = np.array([8, 8, 24], np.float32) + 60 * glow[..., None] * color / 255
    return _blend(bg, color, m)


def render_photo(m: np.ndarray, rng: np.random.Generator, photos: list[np.ndarray]) -> Image.Image:
    """Dark strokes over a washed-out crop of a real photo (a photographed note), near one of a few spots."""
    spot = rng.integers(PHOTO_SPOTS)
    photo = photos[spot % len(photos)]
    spots = np.random.default_rng(spot)  # the spot's place is fixed; each image moves a little around it
    y0, x0 = spots.integers(8, photo.shape[0] - SIZE - 8), spots.integers(8, photo.shape[1] - SIZE - 8)
    y, x = y0 + rng.integers(-8, 9), x0 + rng.integers(-8, 9)
    # out of focus behind the note: colour and light from the photo, little of its edges
    crop = Image.fromarray(photo[y : y + SIZE, x : x + SIZE]).filter(ImageFilter.GaussianBlur(BOKEH))
    crop = 90 + 0.6 * np.asarray(crop, np.float32)
    stroke = rng.uniform(0, 40, 3).astype(np.float32)
    return _blend(crop, stroke, 0.9 * m)


def render_sketch(m: np.ndarray, rng: np.random.Generator, photos: list[np.ndarray]) -> Image.Image:
    """A pencil outline: the edge of the stroke mask, grey on white."""
    mask = Image.fromarray((m > 0.5).astype(np.uint8) * 255)
    edge = np.asarray(mask.filter(ImageFilter.MaxFilter(3)), np.float32) - np.asarray(mask.filter(ImageFilter.MinFilter(3)), np.float32)
    edge = np.asarray(Image.fromarray(edge.astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6)), np.float32) / 255
    pencil = np.full(3, (40.0, 65.0, 90.0)[rng.integers(3)], np.float32)
    return _blend(np.full((SIZE, SIZE, 3), 250.0, np.float32), pencil, np.clip(1.5 * edge, 0, 1))


RENDERERS: dict[str, Callable[[np.ndarray, np.random.Generator, list[np.ndarray]], Image.Image]] = {
    "ink": render_ink,
    "neon": render_neon,
    "photo": render_photo,
    "sketch": render_sketch,
}


def split_disjoint(labels: np.ndarray, n_parts: int, seed: int) -> list[np.ndarray]:
    """Class-stratified split of sample indices into ``n_parts`` disjoint, balanced parts."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(n_parts)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for p, chunk in enumerate(np.array_split(idx, n_parts)):
            parts[p].extend(chunk.tolist())
    return [np.sort(np.array(p)) for p in parts]


def write_demo_images(out: Path, seed: int = 0) -> dict[str, Path]:
    """Renders the four domains as JPEGs plus one image list per domain; returns the lists."""
    from sklearn.datasets import load_digits, load_sample_images

    digits = load_digits()
    photos = [np.asarray(Image.fromarray(p).resize((p.shape[1] // 3, p.shape[0] // 3), Image.BILINEAR)) for p in load_sample_images().images]
    parts = split_disjoint(digits.target, len(DOMAINS), seed)
    lists = {}
    (out / "lists").mkdir(parents=True, exist_ok=True)
    for d, (domain, subset) in enumerate(zip(DOMAINS, parts)):
        rng = np.random.default_rng([seed, d])
        lines = []
        for i in subset:
            label = int(digits.target[i])
            rel = f"{domain}/{label}/{i:04d}.jpg"
            path = out / "images" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            RENDERERS[domain](_stroke_mask(digits.images[i], rng), rng, photos).save(path, quality=92)
            lines.append(f"{rel} {label}\n")
        lists[domain] = out / "lists" / f"{domain}.txt"
        lists[domain].write_text("".join(lines))
    return lists
