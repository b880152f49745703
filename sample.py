"""Sample from, or edit with, a trained mmjax model and write a PNG grid.

    python sample.py --prompt "a large purple triangle at the bottom"        # the shipped model
    python sample.py --workdir runs/vae --prompt "a small green square at the top" --num 16 --out grid.png
    python sample.py --mode img2img     --image in.png --prompt P [--strength 0.6]
    python sample.py --mode inpaint     --image in.png --mask mask.png --prompt P   # white = regenerate
    python sample.py --mode edit        --image in.png --prompt "its caption" --target-prompt "edited"
    python sample.py --mode interpolate --prompt A --prompt B --seed 0 --seed-b 1 --num 8
    python sample.py --mode interpolate --image a.png --image b.png --num 8      # VAE, GAN
    python sample.py --mode reconstruct --image in.png [--prompt P]               # VAE, GAN
    python sample.py --mode invert      --image in.png [--prompt P] [--steps 300] # GAN
    python sample.py --prompt P --attention-maps                                 # diffusion
    python sample.py --workdir path/to/sd-folder --prompt P --height 512 --width 768 --steps 30
                                                  # a diffusers Stable Diffusion 1.x/2.x folder

Every option goes to the model's method of that mode; one that the method does not take (for
this family) is an error that names it, never silently ignored. `model.methods` in Python, or
the README's methods-by-family table, says what each family can do.
"""

import argparse
import os
import sys

PRETRAINED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained", "ldm_shapes")
MODES = ("generate", "img2img", "inpaint", "edit", "interpolate", "reconstruct", "invert")
# Options passed to the mode's method as keywords: flag destination -> keyword.
OPTIONS = {"num": "num", "seed": "seed", "strength": "strength", "guidance": "guidance",
           "negative_prompt": "negative_prompt", "sampler": "sampler", "steps": "steps", "eta": "eta",
           "shift": "shift", "temperature": "temperature", "truncation": "truncation", "clip": "clip",
           "height": "height", "width": "width"}


def _parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="a train.py workdir, an export, or a diffusers Stable Diffusion folder "
                                          f"(default: the shipped {PRETRAINED})")
    parser.add_argument("--step", type=int, help="checkpoint step (default: latest good one)")
    parser.add_argument("--mode", choices=MODES, default="generate")
    parser.add_argument("--prompt", action="append", help="a caption; repeat for several")
    parser.add_argument("--image", action="append", help="an input image (interpolate: give two)")
    parser.add_argument("--mask", help="inpaint: mask image, white (>127) = regenerate")
    parser.add_argument("--target-prompt", help="edit: the caption to edit the image toward")
    parser.add_argument("--out", default="samples.png")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="show libraries' INFO lines (-vv: DEBUG)")
    options = parser.add_argument_group("options of the mode's method (defaults from the model's config)")
    options.add_argument("--num", type=int, help="images per prompt (generate: default 8), or interpolation steps")
    options.add_argument("--seed", type=int, help="random seed (interpolate: at the first end)")
    options.add_argument("--seed-b", type=int, help="interpolate: the seed at the far end")
    options.add_argument("--strength", type=float, help="img2img, edit: how far into the noise, in (0, 1]")
    options.add_argument("--guidance", type=float, help="diffusion: classifier-free guidance scale")
    options.add_argument("--negative-prompt", help="diffusion: the caption guidance steers away from")
    options.add_argument("--sampler", help="diffusion: ddim, ddpm, dpmpp_2m or euler; flow: euler or heun")
    options.add_argument("--steps", type=int, help="denoising steps (diffusion), inversion steps (GAN)")
    options.add_argument("--eta", type=float, help="diffusion: DDIM noise (0 = deterministic)")
    options.add_argument("--shift", type=float, help="flow: time-grid shift toward high noise (> 0; 1 = even)")
    options.add_argument("--height", type=int, help="Stable Diffusion: image height, a multiple of 8")
    options.add_argument("--width", type=int, help="Stable Diffusion: image width, a multiple of 8")
    options.add_argument("--temperature", type=float, help="VAE: the prior's spread")
    options.add_argument("--truncation", type=float, help="GAN: truncate z to [-t, t] (0 = off)")
    options.add_argument("--clip", metavar="WORKDIR", help="VAE, GAN edit: edit by CLIP guidance with this model")
    options.add_argument("--attention-maps", action="store_true",
                         help="generate, diffusion: per-word cross-attention maps under each image")
    old = parser.add_argument_group("deprecated spellings (removed in the next release)")
    old.add_argument("--reconstruct", metavar="IMAGE", help="use --mode reconstruct --image IMAGE")
    old.add_argument("--interpolate", nargs=2, metavar=("IMAGE_A", "IMAGE_B"),
                     help="use --mode interpolate --image A --image B")
    return parser


def _upgrade_old_spellings(args, parser) -> None:
    if args.reconstruct or args.interpolate:
        if args.mode != "generate" or args.image:
            parser.error("--reconstruct/--interpolate IMAGE... are the old spellings of --mode reconstruct/"
                         "interpolate with --image: do not mix them with --mode or --image")
        old, args.mode = ("--reconstruct", "reconstruct") if args.reconstruct else ("--interpolate", "interpolate")
        args.image = [args.reconstruct] if args.reconstruct else list(args.interpolate)
        images = " ".join(f"--image {p}" for p in args.image)
        print(f"sample.py: {old} is deprecated and will be removed in the next release; use "
              f"--mode {args.mode} {images}", file=sys.stderr)


def _check_inputs(args, parser) -> None:
    """The mode's own inputs (prompts, images, mask, target): what it needs and nothing else."""
    images, mode = args.image or [], args.mode
    needs_one_image = mode in ("img2img", "inpaint", "edit", "reconstruct", "invert")
    if needs_one_image and len(images) != 1:
        parser.error(f"--mode {mode} needs one --image, got {len(images)}")
    if mode == "generate" and images:
        parser.error("--mode generate takes no --image (img2img, inpaint and edit do)")
    if mode == "interpolate" and len(images) not in (0, 2):
        parser.error("--mode interpolate takes two --image (between images) or none (between prompts)")
    if mode in ("generate", "img2img", "inpaint", "edit") and not args.prompt:
        parser.error(f"--mode {mode} needs --prompt")
    if mode == "interpolate" and not images and not args.prompt:
        parser.error("--mode interpolate needs --prompt (between prompts/seeds) or two --image")
    if mode in ("img2img", "inpaint", "edit") and len(args.prompt) > 1:
        parser.error(f"--mode {mode} edits one image: give one --prompt")
    for flag, value, modes in (("--mask", args.mask, ("inpaint",)), ("--target-prompt", args.target_prompt, ("edit",)),
                               ("--seed-b", args.seed_b, ("interpolate",)),
                               ("--attention-maps", args.attention_maps or None, ("generate",))):
        if value is not None and mode not in modes:
            parser.error(f"{flag} applies to --mode {' / '.join(modes)}, not {mode}")
    if mode == "inpaint" and not args.mask:
        parser.error("--mode inpaint needs --mask")
    if mode == "edit" and not args.target_prompt:
        parser.error("--mode edit needs --target-prompt")
    for name in ("num", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1")


def _call(method, mode: str, family: str, *args, **options):
    """`method(*args, **options)`, after checking that it takes every option given."""
    import inspect

    accepted = inspect.signature(method).parameters
    flexible = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    flags = {"seed_a": "seed", "seed_b": "seed-b"}
    for key in options:
        if key not in accepted and not flexible:
            flag = "--" + flags.get(key, key).replace("_", "-")
            raise ValueError(f"{flag} does not apply to --mode {mode} of a {family} model "
                             f"(its options: {[k for k in accepted if k not in ('self',)]})")
    return method(*args, **options)


def run(args) -> int:
    import numpy as np

    from mmjax import api
    from mmjax.checkpoint import CheckpointError
    from mmjax.images import load_image, save_png

    options = {OPTIONS[k]: v for k, v in vars(args).items() if k in OPTIONS and v is not None}
    try:
        model = api.load(args.workdir or PRETRAINED, step=args.step)
        family, mode, prompts = model.config.family, args.mode, args.prompt or []
        if mode not in ("interpolate",) and mode not in model.methods:
            raise ValueError(f"a {family} model cannot {mode}; it can: {model.methods}")
        size = model.image_size
        if mode != "generate" and family == "stable_diffusion":
            height, width = options.pop("height", None), options.pop("width", None)
            size = height or width or size  # input images are read square, at this size
        images = [load_image(path, size) for path in args.image or []]
        captions = None
        if mode == "generate":
            options.setdefault("num", 8)  # a row of 8 per prompt, as the docstring shows
            out = _call(model.generate, mode, family, prompts, **options)
            num = options["num"]
            captions = [p for p in prompts for _ in range(num)]
            grid = api.grid(out, ncols=num if len(prompts) > 1 else None, captions=captions)
            if args.attention_maps:
                if "attention_maps" not in model.methods:
                    raise ValueError(f"--attention-maps needs a diffusion model, not a {family} model")
                from mmjax.handles.maps import attention_grid

                results = [_call(model.attention_maps, mode, family, p, **options) for p in prompts]
                grid = attention_grid(results, prompts)
        elif mode == "interpolate" and images:
            if "interpolate_images" not in model.methods:
                raise ValueError(f"a {family} model interpolates between prompts and seeds, not images: "
                                 "give --prompt (and --seed / --seed-b) instead of --image")
            out = _call(model.interpolate_images, mode, family, images[0], images[1],
                        prompt_a=(prompts or [None])[0], prompt_b=(prompts or [None])[-1], **options)
            grid = api.grid(out, ncols=len(out))
        elif mode == "interpolate":
            if "interpolate_prompts" not in model.methods:
                raise ValueError(f"a {family} model interpolates between images: give two --image")
            if "seed" in options:
                options["seed_a"] = options.pop("seed")
            if args.seed_b is not None:
                options["seed_b"] = args.seed_b
            out = _call(model.interpolate_prompts, mode, family, prompts[0], prompts[-1], **options)
            grid = api.grid(out, ncols=len(out))
        elif mode in ("reconstruct", "invert"):
            out = _call(getattr(model, mode), mode, family, images[0][None], prompts[:1] or None, **options)
            if mode == "invert":
                latents, out = out
                error = ((out[0].astype(np.float64) - images[0]) / 255.0) ** 2
                print(f"inversion PSNR {10 * np.log10(1.0 / max(error.mean(), 1e-10)):.2f} dB, "
                      f"z+ latent {latents['z'].shape[1:]}")
            grid = api.grid(np.stack([images[0], out[0]]), ncols=2)
        else:
            image = images[0][None]
            if mode == "img2img":
                out = _call(model.img2img, mode, family, image, prompts[0], **options)
            elif mode == "inpaint":
                mask = load_image(args.mask, size).mean(axis=-1) > 127
                out = _call(model.inpaint, mode, family, image, mask[None], prompts[0], **options)
            else:
                out = _call(model.edit, mode, family, image, prompts[0], args.target_prompt, **options)
            grid = api.grid(np.stack([images[0], out[0]]), ncols=2)
    except (FileNotFoundError, ValueError, NotImplementedError, CheckpointError) as e:
        print(f"sample.py: {e}", file=sys.stderr)
        return 2
    save_png(grid, args.out)
    print(f"wrote {os.path.abspath(args.out)} ({len(out)} images from {model})")
    return 0


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _upgrade_old_spellings(args, parser)
    _check_inputs(args, parser)
    from mmjax.logs import setup_logging

    setup_logging(args.verbose)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
