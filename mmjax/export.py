"""Export a run's EMA weights and config into a small directory that `mmjax.load` reads.

    python -m mmjax.export --workdir runs/ldm --out pretrained/ldm_shapes [--step N] [--dtype float16]

The export holds no optimizer state (a fraction of a checkpoint's size) and a sha256 of the
weights that `load` checks. An existing --out is refused rather than overwritten.
"""

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--step", type=int)
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="storage precision of the weights (loaded back as float32)")
    args = parser.parse_args(argv)
    from mmjax import api
    from mmjax.checkpoint import CheckpointError

    try:
        out = api.export(args.workdir, args.out, step=args.step, dtype=args.dtype)
    except (FileNotFoundError, FileExistsError, ValueError, CheckpointError) as e:
        print(f"mmjax.export: {e}", file=sys.stderr)
        return 2
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"wrote {out} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
