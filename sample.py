"""Sample from a trained mmjax model and write a PNG grid.

    python sample.py --workdir runs/vae --prompt "a small green square at the top" --num 16 --out grid.png
    python sample.py --workdir runs/vae --reconstruct img.png [--prompt "caption of img"] --out recon.png
    python sample.py --workdir runs/vae --interpolate a.png b.png --num 8 --out path.png
"""

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a train.py workdir")
    parser.add_argument("--prompt", action="append", help="a caption; repeat for several")
    parser.add_argument("--num", type=int, default=8, help="images per prompt, or interpolation steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="samples.png")
    parser.add_argument("--reconstruct", metavar="IMAGE")
    parser.add_argument("--interpolate", nargs=2, metavar=("IMAGE_A", "IMAGE_B"))
    parser.add_argument("--step", type=int, help="checkpoint step (default: latest good one)")
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error("--num must be at least 1")

    from mmjax import api
    from mmjax.checkpoint import CheckpointError
    from mmjax.images import load_image, save_png

    try:
        model = api.load(args.workdir, step=args.step)
        size = model.image_size
        prompts = args.prompt or []
        if args.reconstruct:
            image = load_image(args.reconstruct, size)
            out = model.reconstruct(image[None], prompts[:1] or None)
            grid, captions = api.grid([image, out[0]], ncols=2), None
        elif args.interpolate:
            a, b = (load_image(p, size) for p in args.interpolate)
            out = model.interpolate(a, b, num=args.num, prompt_a=(prompts or [None])[0],
                                    prompt_b=(prompts or [None])[-1])
            grid = api.grid(out, ncols=args.num)
        else:
            if not prompts:
                parser.error("give --prompt (or --reconstruct / --interpolate)")
            out = model.generate(prompts, num=args.num, seed=args.seed)
            captions = [p for p in prompts for _ in range(args.num)]
            grid = api.grid(out, ncols=args.num if len(prompts) > 1 else None, captions=captions)
    except (FileNotFoundError, ValueError, NotImplementedError, CheckpointError) as e:
        print(f"sample.py: {e}", file=sys.stderr)
        return 2
    save_png(grid, args.out)
    print(f"wrote {os.path.abspath(args.out)} ({len(out)} images from {model})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
