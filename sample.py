"""Sample from, or edit with, a trained mmjax model and write a PNG grid.

    python sample.py --prompt "a large purple triangle at the bottom"          # the shipped model in pretrained/
    python sample.py --workdir runs/vae --prompt "a small green square at the top" --num 16 --out grid.png
    python sample.py --workdir runs/vae --reconstruct img.png [--prompt "caption of img"] --out recon.png
    python sample.py --workdir runs/vae --interpolate a.png b.png --num 8 --out path.png

Diffusion models also take --mode:
    --mode generate    --prompt P [--guidance 3 --sampler ddim|ddpm|dpmpp_2m|euler --steps 50 --negative-prompt N]
    --mode img2img     --image IMG --prompt P --strength 0.6
    --mode inpaint     --image IMG --mask MASK.png (white = regenerate) --prompt P
    --mode edit        --image IMG --prompt "its caption" --target-prompt "the edited caption"
    --mode interpolate --prompt A [--prompt B] --seed 0 [--seed-b 1] --num 8

GANs take --mode generate [--truncation 1.5], edit (inverts the image under --prompt, then
regenerates its latent under --target-prompt; --steps sets the inversion steps), interpolate
(as above: z slerped, captions blended) and invert:
    --mode invert      --image IMG [--prompt "its caption"] [--steps 300]   # image | reconstruction
"""

import argparse
import os
import sys

PRETRAINED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained", "ldm_shapes")
MODES = ("generate", "img2img", "inpaint", "edit", "interpolate", "invert")


def _parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help=f"a train.py workdir (default: the shipped {PRETRAINED})")
    parser.add_argument("--mode", choices=MODES, default="generate")
    parser.add_argument("--prompt", action="append", help="a caption; repeat for several")
    parser.add_argument("--num", type=int, default=8, help="images per prompt, or interpolation steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seed-b", type=int, help="interpolate: the seed at the far end")
    parser.add_argument("--out", default="samples.png")
    parser.add_argument("--step", type=int, help="checkpoint step (default: latest good one)")
    parser.add_argument("--reconstruct", metavar="IMAGE", help="autoencoders: reconstruct an image")
    parser.add_argument("--interpolate", nargs=2, metavar=("IMAGE_A", "IMAGE_B"),
                        help="autoencoders: interpolate between two images")
    diffusion = parser.add_argument_group("diffusion")
    diffusion.add_argument("--sampler", help="ddim (default from the config), ddpm, dpmpp_2m or euler")
    diffusion.add_argument("--steps", type=int, help="denoising steps")
    diffusion.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    diffusion.add_argument("--negative-prompt", help="the caption guidance steers away from")
    diffusion.add_argument("--image", help="img2img / inpaint / edit: the input image")
    diffusion.add_argument("--mask", help="inpaint: mask image, white (>127) = regenerate")
    diffusion.add_argument("--strength", type=float, default=0.6, help="img2img: noise level in (0, 1]")
    diffusion.add_argument("--target-prompt", help="edit: the caption to edit the image toward")
    gan = parser.add_argument_group("GAN")
    gan.add_argument("--truncation", type=float, help="generate/interpolate: truncate z to [-t, t] (0 = off)")
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error("--num must be at least 1")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.mode in ("img2img", "inpaint", "edit", "invert") and not args.image:
        parser.error(f"--mode {args.mode} needs --image")
    if args.mode == "inpaint" and not args.mask:
        parser.error("--mode inpaint needs --mask")
    if args.mode == "edit" and not args.target_prompt:
        parser.error("--mode edit needs --target-prompt")
    prompts = args.prompt or []
    if not prompts and not (args.reconstruct or args.interpolate or args.mode == "invert"):
        parser.error("give --prompt (or --reconstruct / --interpolate for autoencoders)")

    import numpy as np

    from mmjax import api
    from mmjax.checkpoint import CheckpointError
    from mmjax.images import load_image, save_png

    workdir = args.workdir or PRETRAINED
    options = {k: v for k, v in (("sampler", args.sampler), ("steps", args.steps), ("truncation", args.truncation))
               if v is not None}
    guidance = {} if args.guidance is None else {"guidance": args.guidance}
    try:
        model = api.load(workdir, step=args.step)
        size = model.image_size
        captions = None
        if args.reconstruct:
            image = load_image(args.reconstruct, size)
            out = model.reconstruct(image[None], prompts[:1] or None)
            grid = api.grid([image, out[0]], ncols=2)
        elif args.interpolate:
            a, b = (load_image(p, size) for p in args.interpolate)
            out = model.interpolate(a, b, num=args.num, prompt_a=(prompts or [None])[0],
                                    prompt_b=(prompts or [None])[-1])
            grid = api.grid(out, ncols=args.num)
        elif args.mode == "invert":
            image = load_image(args.image, size)
            steps = {"steps": args.steps} if args.steps is not None else {}
            latents, out = model.invert(image[None], prompts[:1] or None, seed=args.seed, **steps)
            error = ((out[0].astype(np.float64) - image) / 255.0) ** 2
            print(f"inversion PSNR {10 * np.log10(1.0 / max(error.mean(), 1e-10)):.2f} dB, "
                  f"z+ latent {latents['z'].shape[1:]}")
            grid = api.grid(np.stack([image, out[0]]), ncols=2)
        elif args.mode == "generate":
            out = model.generate(prompts, num=args.num, seed=args.seed, negative_prompt=args.negative_prompt,
                                 **guidance, **options)
            captions = [p for p in prompts for _ in range(args.num)]
            grid = api.grid(out, ncols=args.num if len(prompts) > 1 else None, captions=captions)
        elif args.mode == "interpolate":
            out = model.interpolate(num=args.num, prompt_a=prompts[0], prompt_b=prompts[-1], seed_a=args.seed,
                                    seed_b=args.seed_b, **options)
            grid = api.grid(out, ncols=args.num)
        else:
            image = load_image(args.image, size)
            if args.mode == "img2img":
                out = model.img2img(image[None], prompts[0], strength=args.strength, seed=args.seed,
                                    **guidance, **options)
            elif args.mode == "inpaint":
                mask = load_image(args.mask, size).mean(axis=-1) > 127
                out = model.inpaint(image[None], mask[None], prompts[0], seed=args.seed, **guidance, **options)
            else:
                out = model.edit(image[None], prompts[0], args.target_prompt, **guidance, **options)
            grid = api.grid(np.stack([image, out[0]]), ncols=2)
    except (FileNotFoundError, ValueError, NotImplementedError, CheckpointError) as e:
        print(f"sample.py: {e}", file=sys.stderr)
        return 2
    save_png(grid, args.out)
    print(f"wrote {os.path.abspath(args.out)} ({len(out)} images from {model})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
