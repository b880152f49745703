"""Image conventions at the edges: model tensors are NHWC float in [-1, 1], users get uint8."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images) -> np.ndarray:
    """[-1, 1] floats -> uint8 with round-to-nearest (deterministic, no dithering)."""
    images = np.asarray(images, dtype=np.float32)
    return np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_float(images) -> np.ndarray:
    """uint8 (or [-1, 1] floats, passed through) -> float32 in [-1, 1]."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 127.5 - 1.0
    return images.astype(np.float32)


def load_image(path: str, size: int) -> np.ndarray:
    """Reads an image file as uint8 RGB [size, size, 3]; a clear error when it cannot."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path!r}")
    try:
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path!r}: {e}") from e
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8)


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, TypeError):  # Pillow without FreeType has only the small bitmap font.
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line] if line else lines


def make_grid(images, *, ncols: int | None = None, captions=None, pad: int = 4,
              min_cell: int = 128, upscale: bool = False) -> Image.Image:
    """uint8 [N, H, W, 3] -> one PIL image; with captions, each is wrapped under its cell.

    Small images are upscaled (nearest) to at least `min_cell` pixels when captioned, so that a
    caption of ~50 characters fits in three lines, or when `upscale` (for a person to look at).
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = to_uint8(images)
    n, h, w, _ = images.shape
    ncols = ncols or max(1, math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncols)
    scale = max(1, math.ceil(min_cell / h)) if captions is not None or upscale else 1
    cw, ch = w * scale, h * scale
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(measure, str(c), font, cw) for c in captions] if captions is not None else [[]] * n
    ascent, descent = font.getmetrics()
    line_height = ascent + descent + 2
    text_h = max(len(lines) for lines in wrapped) * line_height + (pad if captions is not None else 0)
    cell_w, cell_h = cw + pad, ch + text_h + pad
    grid = Image.new("RGB", (ncols * cell_w + pad, nrows * cell_h + pad), (64, 64, 64))
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        x, y = pad + (i % ncols) * cell_w, pad + (i // ncols) * cell_h
        grid.paste(Image.fromarray(images[i]).resize((cw, ch), Image.Resampling.NEAREST), (x, y))
        for j, line in enumerate(wrapped[i]):
            draw.text((x, y + ch + pad + j * line_height), line, fill=(255, 255, 255), font=font)
    return grid


def save_png(image: Image.Image, path: str) -> None:
    """Writes atomically: a reader never sees a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp"
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
