"""Data tools. Preview a dataset as a captioned grid:

    python -m mmjax.data preview --dataset shapes --out preview.png --split test --num 16
"""
from __future__ import annotations

import argparse
import math
import types
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mmjax.data.pipeline import SOURCES, make_source

MIN_CELL = 128  # Small images are upscaled so a caption of ~50 characters fits in 3 lines.
PAD = 4


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


def captioned_grid(images: Sequence[np.ndarray], captions: Sequence[str]) -> Image.Image:
    """A grid of uint8 images with each caption wrapped beneath its image."""
    try:
        font = ImageFont.load_default(size=12)
    except ImportError:  # Pillow without FreeType only has the small bitmap font.
        font = ImageFont.load_default()
    cell = max(MIN_CELL, images[0].shape[0])
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(measure, c, font, cell) for c in captions]
    ascent, descent = font.getmetrics()
    line_height = ascent + descent + 2
    text_height = max(len(w) for w in wrapped) * line_height
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    cell_w, cell_h = cell + 2 * PAD, cell + text_height + 3 * PAD
    grid = Image.new("RGB", (cols * cell_w, rows * cell_h), (64, 64, 64))
    draw = ImageDraw.Draw(grid)
    for i, (image, lines) in enumerate(zip(images, wrapped)):
        x, y = (i % cols) * cell_w + PAD, (i // cols) * cell_h + PAD
        tile = Image.fromarray(image).resize((cell, cell), Image.Resampling.NEAREST)
        grid.paste(tile, (x, y))
        for j, line in enumerate(lines):
            draw.text((x, y + cell + PAD + j * line_height), line, fill=(255, 255, 255), font=font)
    return grid


def preview(args: argparse.Namespace) -> None:
    data_cfg = types.SimpleNamespace(
        name=args.dataset, image_size=args.image_size, seed=args.seed, num_train=None, num_test=None
    )
    source = make_source(data_cfg, args.split)
    records = [source[i] for i in range(min(args.num, len(source)))]
    captioned_grid([r["image"] for r in records], [r["caption"] for r in records]).save(args.out)
    print(f"wrote {len(records)} {args.dataset}/{args.split} records to {args.out}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mmjax.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("preview", help="write a grid of images with their captions")
    p.add_argument("--dataset", required=True, choices=sorted(SOURCES))
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="train", choices=("train", "test"))
    p.add_argument("--num", type=int, default=16)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.num < 1:
        p.error(f"--num must be positive, got {args.num}")
    try:
        preview(args)
    except ValueError as e:  # e.g. an image size the dataset does not support
        p.error(str(e))


if __name__ == "__main__":
    main()
