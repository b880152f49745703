"""Data tools. Preview a dataset as a captioned grid:

    python -m mmjax.data preview --dataset shapes --out preview.png --split test --num 16
    python -m mmjax.data preview --dataset folder --path DIR --out preview.png
    python -m mmjax.data preview --dataset cifar10 --path DIR/cifar-10-batches-py --out preview.png
    python -m mmjax.data preview --dataset mnist --path DIR --out preview.png

Real datasets are checked as in training: unreadable images are listed on stderr.
"""
from __future__ import annotations

import argparse
import logging
from typing import Sequence

import numpy as np

from mmjax.data.pipeline import PATH_DATASETS, SOURCES, make_source
from mmjax.images import make_grid, save_png


def preview(args: argparse.Namespace) -> None:
    from mmjax.config import base_config

    data_cfg = base_config().data
    data_cfg.name, data_cfg.image_size, data_cfg.seed = args.dataset, args.image_size, args.seed
    data_cfg.path = args.path or ""
    data_cfg.max_bad_fraction = args.max_bad_fraction
    source = make_source(data_cfg, args.split)
    # Spread over the split, so a class-sorted folder shows more than its first class.
    indices = np.unique(np.linspace(0, len(source) - 1, min(args.num, len(source))).round().astype(int))
    records = [source[int(i)] for i in indices]
    grid = make_grid(np.stack([r["image"] for r in records]), captions=[r["caption"] for r in records])
    save_png(grid, args.out)
    print(f"wrote {len(records)} of {len(source)} {args.dataset}/{args.split} records to {args.out}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mmjax.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("preview", help="write a grid of images with their captions")
    p.add_argument("--dataset", required=True, choices=sorted(SOURCES))
    p.add_argument("--out", required=True)
    p.add_argument("--path", help=f"the dataset's directory ({', '.join(PATH_DATASETS)})")
    p.add_argument("--split", default="train", choices=("train", "test"))
    p.add_argument("--num", type=int, default=16)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-bad-fraction", type=float, default=1.0,
                   help="stop when more images than this cannot be read (default 1: only list them)")
    args = parser.parse_args(argv)
    if args.num < 1:
        p.error(f"--num must be positive, got {args.num}")
    if args.dataset in PATH_DATASETS and not args.path:
        p.error(f"--dataset {args.dataset} needs --path DIR")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        preview(args)
    except ValueError as e:  # e.g. a missing folder, too many bad images, a bad image size
        p.error(str(e))


if __name__ == "__main__":
    main()
