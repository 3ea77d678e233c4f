"""Drawing a product's images from its category's style (PIL), as JPEG bytes."""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from tfcdisc.catalogue.synth.styles import (IMAGE_SIZE, _MARKS, _SHAPES, _TEXTURES,
                                            CategoryStyle)



def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return int(r * 255), int(g * 255), int(b * 255)


def _shape_mask(shape: int, size: int) -> Image.Image:
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    s, c = size, size / 2
    name = _SHAPES[shape]
    if name == "ellipse":
        d.ellipse((4, s * 0.18, s - 4, s * 0.82), fill=255)
    elif name == "rectangle":
        d.rectangle((s * 0.12, s * 0.2, s * 0.88, s * 0.8), fill=255)
    elif name == "triangle":
        d.polygon([(c, 4), (s - 4, s - 8), (4, s - 8)], fill=255)
    elif name == "diamond":
        d.polygon([(c, 2), (s - 2, c), (c, s - 2), (2, c)], fill=255)
    elif name in ("hexagon", "star"):
        n = 6 if name == "hexagon" else 10
        pts = []
        for i in range(n):
            r = c - 4 if name == "hexagon" or i % 2 == 0 else c * 0.45
            a = math.pi * 2 * i / n
            pts.append((c + r * math.cos(a), c + r * math.sin(a)))
        d.polygon(pts, fill=255)
    elif name == "cross":
        d.rectangle((s * 0.36, 4, s * 0.64, s - 4), fill=255)
        d.rectangle((4, s * 0.36, s - 4, s * 0.64), fill=255)
    elif name == "ring":
        d.ellipse((4, 4, s - 4, s - 4), fill=255)
        d.ellipse((s * 0.3, s * 0.3, s * 0.7, s * 0.7), fill=0)
    elif name == "bottle":
        d.rounded_rectangle((s * 0.25, s * 0.35, s * 0.75, s - 4), radius=10, fill=255)
        d.rectangle((s * 0.42, 4, s * 0.58, s * 0.4), fill=255)
    elif name == "arch":
        d.pieslice((4, 4, s - 4, s * 1.4), 180, 360, fill=255)
    elif name == "trapezoid":
        d.polygon([(s * 0.3, s * 0.15), (s * 0.7, s * 0.15), (s - 4, s * 0.85),
                   (4, s * 0.85)], fill=255)
    else:  # pill
        d.rounded_rectangle((4, s * 0.3, s - 4, s * 0.7), radius=int(s * 0.2), fill=255)
    return m


def _item(style: CategoryStyle, rng: np.random.Generator) -> Image.Image:
    """Renders one product (an RGBA object); its views transform this same item."""
    size = 128
    hue = (style.hue + rng.normal(0, 0.015)) % 1.0
    sat = float(np.clip(style.saturation + rng.normal(0, 0.04), 0.2, 1.0))
    base = _hsv(hue, sat, 0.55 + 0.35 * rng.random())
    dark = tuple(int(v * 0.55) for v in base)
    layer = Image.new("RGBA", (size, size), base + (255,))
    d = ImageDraw.Draw(layer)
    step = int(rng.integers(9, 14))
    phase = int(rng.integers(0, step))
    texture = _TEXTURES[style.texture]
    if texture == "stripes":
        for x in range(phase, size, step):
            d.line((x, 0, x, size), fill=dark, width=3)
    elif texture == "dots":
        for y in range(phase, size, step):
            for x in range(phase, size, step):
                d.ellipse((x - 2, y - 2, x + 2, y + 2), fill=dark)
    elif texture == "checker":
        for y in range(0, size, step):
            for x in range((y // step) % 2 * step, size, 2 * step):
                d.rectangle((x, y, x + step - 1, y + step - 1), fill=dark)
    elif texture == "diagonal":
        for x in range(-size + phase, size, step):
            d.line((x, 0, x + size, size), fill=dark, width=3)
    elif texture == "grid":
        for v in range(phase, size, step):
            d.line((v, 0, v, size), fill=dark, width=1)
            d.line((0, v, size, v), fill=dark, width=1)
    light = (250, 250, 245)
    mark = _MARKS[style.mark]
    if mark == "disc":
        d.ellipse((48, 48, 80, 80), fill=light)
    elif mark == "bar":
        d.rectangle((24, 56, 104, 70), fill=light)
    elif mark == "corner":
        d.rectangle((30, 30, 56, 56), fill=(30, 30, 30))
    elif mark == "band":
        d.rectangle((0, 88, size, 100), fill=(20, 20, 60))
    layer.putalpha(_shape_mask(style.shape, size))
    return layer


def _background(style: CategoryStyle, rng: np.random.Generator) -> np.ndarray:
    tint = np.array(_hsv(style.bg_hue, 0.08 + 0.06 * rng.random(), 0.9 + 0.1 * rng.random()),
                    np.float32)
    ramp = np.linspace(-10, 10, IMAGE_SIZE, dtype=np.float32)
    bg = np.broadcast_to(tint, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    if style.bg_gradient == 1:
        bg += ramp[:, None, None]
    elif style.bg_gradient == 2:
        bg += ramp[None, :, None]
    return bg


def _view(item: Image.Image, style: CategoryStyle, rng: np.random.Generator) -> bytes:
    """One photo of the item: a new pose, light and noise, JPEG at quality 70-95."""
    scale = rng.uniform(0.75, 1.15)
    side = int(item.width * scale)
    obj = item.resize((side, side), Image.BILINEAR).rotate(
        float(rng.uniform(-25, 25)), resample=Image.BILINEAR, expand=True)
    canvas = Image.fromarray(np.clip(_background(style, rng), 0, 255).astype(np.uint8))
    x = (IMAGE_SIZE - obj.width) // 2 + int(rng.integers(-18, 19))
    y = (IMAGE_SIZE - obj.height) // 2 + int(rng.integers(-18, 19))
    canvas.paste(obj, (x, y), obj)
    pixels = np.asarray(canvas, np.int16) * rng.uniform(0.9, 1.05)
    pixels += rng.integers(-3, 4, pixels.shape, dtype=np.int16)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        out, "JPEG", quality=int(rng.integers(70, 96)))
    return out.getvalue()


def render_product(style: CategoryStyle, num_images: int, seed: Sequence[int]) -> list[bytes]:
    rng = np.random.default_rng(list(seed))
    item = _item(style, rng)
    return [_view(item, style, rng) for _ in range(num_images)]


def _noise_style(seed: Sequence[int]) -> CategoryStyle:
    """A look that belongs to no category: any shape, hue and texture, together."""
    rng = np.random.default_rng(list(seed))
    return CategoryStyle(bg_hue=float(rng.random()), bg_gradient=int(rng.integers(3)),
                         shape=int(rng.integers(len(_SHAPES))), hue=float(rng.random()),
                         saturation=float(rng.uniform(0.2, 0.9)),
                         texture=int(rng.integers(len(_TEXTURES))),
                         mark=int(rng.integers(len(_MARKS))))
