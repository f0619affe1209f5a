"""A second demo dataset of another kind: ten geometric shapes in four material-like domains.

It exists to check a finding of the digits demo on data that the digits renderer did not make:
the classes are filled outlines of shapes rather than scanned strokes, and the domains differ by
texture, tiling, line quality and shading rather than by ink colour and background. Shapes are
drawn at 4x resolution and downsampled (anti-aliased edges), each image with its own random pose.

The domains (each from small palettes shared by many images, so that instance discrimination
has to learn the shape rather than a per-image colour):
- ``fabric``: the shape woven in a striped or checked cloth of two colours, on plain cloth;
- ``mosaic``: square tiles with grout lines, the shape's tiles in one colour family;
- ``chalk``: a rough, broken white outline on a smudged blackboard;
- ``relief``: the shape embossed in grey stone, lit from one side (shading only, no colour).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

DOMAINS = ("fabric", "mosaic", "chalk", "relief")
CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "arrow", "hexagon", "crescent", "diamond")
PER_CLASS = 45  # per domain: 450 images per domain, about the size of a digits demo domain
SIZE = 64
SUPER = 4  # drawing resolution factor


def _polygon(points: list[tuple[float, float]], angle: float, scale: float, centre: tuple[float, float]
             ) -> list[tuple[float, float]]:
    """Unit-square shape points (around 0) rotated, scaled and moved to ``centre`` at drawing resolution."""
    c, s = math.cos(angle), math.sin(angle)
    return [(centre[0] + scale * (c * x - s * y), centre[1] + scale * (s * x + c * y)) for x, y in points]


def _regular(n: int, r: float = 0.5, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(r * math.cos(phase + 2 * math.pi * k / n), r * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _star() -> list[tuple[float, float]]:
    outer, inner = _regular(5), _regular(5, 0.2, -math.pi / 2 + math.pi / 5)
    return [p for pair in zip(outer, inner) for p in pair]


OUTLINES: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.4, -0.4), (0.4, -0.4), (0.4, 0.4), (-0.4, 0.4)],
    "triangle": _regular(3, 0.55, -math.pi / 2),
    "star": _star(),
    "cross": [(-0.15, -0.5), (0.15, -0.5), (0.15, -0.15), (0.5, -0.15), (0.5, 0.15), (0.15, 0.15), (0.15, 0.5),
              (-0.15, 0.5), (-0.15, 0.15), (-0.5, 0.15), (-0.5, -0.15), (-0.15, -0.15)],
    "arrow": [(-0.5, -0.12), (0.05, -0.12), (0.05, -0.35), (0.5, 0.0), (0.05, 0.35), (0.05, 0.12), (-0.5, 0.12)],
    "hexagon": _regular(6, 0.5, 0.0),
    "diamond": [(0.0, -0.5), (0.32, 0.0), (0.0, 0.5), (-0.32, 0.0)],
}


def shape_mask(cls: str, rng: np.random.Generator) -> np.ndarray:
    """A (SIZE, SIZE) mask in [0, 1] of one shape with a random pose (rotation within ±35°, scale, shift)."""
    big = SIZE * SUPER
    img = Image.new("L", (big, big))
    draw = ImageDraw.Draw(img)
    scale = big * rng.uniform(0.55, 0.8)
    centre = (big / 2 + big * rng.uniform(-0.08, 0.08), big / 2 + big * rng.uniform(-0.08, 0.08))
    angle = math.radians(rng.uniform(-35, 35))
    if cls in OUTLINES:
        draw.polygon(_polygon(OUTLINES[cls], angle, scale, centre), fill=255)
    else:  # round shapes: ellipses with a little random aspect, and their differences
        rx, ry = 0.45 * scale, 0.45 * scale * rng.uniform(0.85, 1.0)
        box = [centre[0] - rx, centre[1] - ry, centre[0] + rx, centre[1] + ry]
        draw.ellipse(box, fill=255)
        if cls == "ring":
            draw.ellipse([centre[0] - 0.55 * rx, centre[1] - 0.55 * ry, centre[0] + 0.55 * rx, centre[1] + 0.55 * ry], fill=0)
        elif cls == "crescent":
            dx, dy = 0.45 * rx * math.cos(angle), 0.45 * rx * math.sin(angle)
            draw.ellipse([box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy], fill=0)
    return np.asarray(img.resize((SIZE, SIZE), Image.LANCZOS), np.float32) / 255.0


def _blend(bg: np.ndarray, fg: np.ndarray, m: np.ndarray) -> Image.Image:
    img = bg * (1 - m[..., None]) + fg * m[..., None]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


CLOTH = np.array([[180, 40, 50], [40, 70, 150], [230, 190, 60], [60, 130, 80]], np.float32)
TILES = np.array([[30, 90, 170], [190, 70, 40], [40, 150, 120]], np.float32)
GROUT = np.array([200, 195, 185], np.float32)


def render_fabric(m: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Stripes or checks of two cloth colours inside the shape, plain cloth of a third around it."""
    a, b, plain = CLOTH[rng.permutation(len(CLOTH))[:3]]
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    theta, period = rng.uniform(0, math.pi), rng.choice([4.0, 6.0])
    u = np.cos(theta) * xx + np.sin(theta) * yy
    pattern = (np.sin(2 * math.pi * u / period) > 0).astype(np.float32)
    if rng.random() < 0.5:  # checks
        v = -np.sin(theta) * xx + np.cos(theta) * yy
        pattern = np.abs(pattern - (np.sin(2 * math.pi * v / period) > 0))
    weave = 8 * (((xx + yy) % 2) - 0.5)[..., None]  # the thread grain, on everything
    inside = a * pattern[..., None] + b * (1 - pattern[..., None])
    return _blend(plain + weave, inside + weave, m)


def render_mosaic(m: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """4-px tiles, each one colour: tiles mostly inside the shape in one colour family, others pale."""
    tile = 4
    n = SIZE // tile
    cover = m.reshape(n, tile, n, tile).mean(axis=(1, 3))
    family = TILES[rng.integers(len(TILES))]
    colours = np.where((cover > 0.5)[..., None], family + rng.normal(0, 18, (n, n, 3)),
                       np.array([235, 225, 205], np.float32) + rng.normal(0, 10, (n, n, 3)))
    img = np.kron(colours, np.ones((tile, tile, 1), np.float32))
    grout = np.zeros((SIZE, SIZE), bool)
    grout[::tile, :] = grout[:, ::tile] = True
    img[grout] = GROUT
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def render_chalk(m: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """The shape's outline in rough white chalk, broken where the chalk skipped, on a smudged board."""
    mask = Image.fromarray((m * 255).astype(np.uint8))
    edge = ImageChops.subtract(mask.filter(ImageFilter.MaxFilter(5)), mask.filter(ImageFilter.MinFilter(3)))
    grain = rng.random((SIZE, SIZE)) < 0.75  # chalk skips on the board's pores
    line = np.asarray(edge, np.float32) / 255 * grain
    board = np.array([35, 60, 45], np.float32) + np.asarray(
        Image.fromarray(rng.normal(0, 10, (8, 8)).astype(np.float32), mode="F").resize((SIZE, SIZE), Image.BICUBIC))[..., None]
    return _blend(board, np.array([235, 235, 225], np.float32), np.clip(line, 0, 1))


def render_relief(m: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """The shape raised from grey stone: shading from a light direction, no outline and no colour."""
    height = np.asarray(Image.fromarray((m * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.5)), np.float32)
    gy, gx = np.gradient(height)
    light = rng.uniform(0, 2 * math.pi)
    shade = 1.2 * (math.cos(light) * gx + math.sin(light) * gy)
    stone = 140 + rng.normal(0, 6, (SIZE, SIZE))
    grey = np.clip(stone + shade, 0, 255)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2).astype(np.uint8))


RENDERERS: dict[str, Callable[[np.ndarray, np.random.Generator], Image.Image]] = {
    "fabric": render_fabric,
    "mosaic": render_mosaic,
    "chalk": render_chalk,
    "relief": render_relief,
}


def write_shape_images(out: Path, seed: int = 0) -> dict[str, Path]:
    """Renders the four domains as JPEGs plus one image list per domain; returns the lists.

    Every image draws its own pose, so no two images (in a domain or across domains) share a source.
    """
    lists = {}
    (out / "lists").mkdir(parents=True, exist_ok=True)
    for d, domain in enumerate(DOMAINS):
        rng = np.random.default_rng([seed, 100 + d])
        lines = []
        for label, cls in enumerate(CLASSES):
            for i in range(PER_CLASS):
                rel = f"{domain}/{label}/{i:04d}.jpg"
                path = out / "images" / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                RENDERERS[domain](shape_mask(cls, rng), rng).save(path, quality=92)
                lines.append(f"{rel} {label}\n")
        lists[domain] = out / "lists" / f"{domain}.txt"
        lists[domain].write_text("".join(lines))
    return lists
