"""Data tools. Preview a dataset as a captioned grid:

    python -m mmjax.data preview --dataset shapes --out preview.png --split test --num 16
"""
from __future__ import annotations

import argparse
import types
from typing import Sequence

import numpy as np

from mmjax.data.pipeline import SOURCES, make_source
from mmjax.images import make_grid, save_png

def preview(args: argparse.Namespace) -> None:
    data_cfg = types.SimpleNamespace(
        name=args.dataset, image_size=args.image_size, seed=args.seed, num_train=None, num_test=None
    )
    source = make_source(data_cfg, args.split)
    records = [source[i] for i in range(min(args.num, len(source)))]
    grid = make_grid(np.stack([r["image"] for r in records]), captions=[r["caption"] for r in records])
    save_png(grid, args.out)
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
