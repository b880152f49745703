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


def make_grid(images: np.ndarray, *, ncols: int | None = None, captions=None,
              cell: int | None = None, pad: int = 2) -> Image.Image:
    """uint8 [N, H, W, 3] -> one PIL image; optional caption under each cell."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = to_uint8(images)
    n, h, w, _ = images.shape
    ncols = ncols or min(n, max(1, math.ceil(math.sqrt(n))))
    nrows = math.ceil(n / ncols)
    cell = cell or max(h, 96 if captions is not None else h)
    scale = max(1, cell // h)
    ch, cw = h * scale, w * scale
    font = ImageFont.load_default()
    lines = 3 if captions is not None else 0
    text_h = 12 * lines
    grid = Image.new("RGB", (ncols * (cw + pad) + pad, nrows * (ch + text_h + pad) + pad), (40, 40, 40))
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        r, c = divmod(i, ncols)
        x, y = pad + c * (cw + pad), pad + r * (ch + text_h + pad)
        tile = Image.fromarray(images[i]).resize((cw, ch), Image.Resampling.NEAREST)
        grid.paste(tile, (x, y))
        if captions is not None:
            for j, line in enumerate(_wrap(str(captions[i]), max(4, cw // 6))[:lines]):
                draw.text((x + 1, y + ch + 12 * j), line, fill=(230, 230, 230), font=font)
    return grid


def _wrap(text: str, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    if line:
        lines.append(line)
    return lines


def save_png(image: Image.Image, path: str) -> None:
    """Writes atomically: a reader never sees a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp"
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
