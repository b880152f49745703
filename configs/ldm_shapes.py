"""Latent text-to-image diffusion on `shapes`: a UNet on the 4x4x8 latents of a frozen VAE.

Train the VAE first (configs/vae_shapes.py), then point `latent.vae_workdir` at it (a run
directory is the command line's to name, not the config's, so there is no default):

    python train.py --config configs/vae_shapes.py --workdir runs/vae
    python train.py --config configs/ldm_shapes.py --workdir runs/ldm --config.latent.vae_workdir=runs/vae
    python sample.py --workdir runs/ldm --prompt "a large purple triangle at the bottom" --out grid.png

CPU smoke run, on the tiny VAE:

    python train.py --config configs/vae_shapes.py:tiny --workdir runs/vae_tiny
    python train.py --config configs/ldm_shapes.py:tiny --workdir runs/ldm_tiny --config.latent.vae_workdir=runs/vae_tiny

The VAE's weights are copied into the run's parameters (frozen), so the LDM checkpoint samples
on its own.
"""

from mmjax.config import base_config, tiny
from mmjax.families.diffusion import add_defaults


def get_config(arg=None):
    c = base_config()
    c.family = "diffusion"
    c.variant = "latent_small"
    add_defaults(c)
    c.model.out_channels = 8
    # 5.4M parameters (+ 0.45M text encoder): about 0.3 s a step at batch 64 on a 2-core CPU.
    c.model.base_channels = 64
    c.loss.prediction = "v"
    c.train.num_steps = 6000
    c.train.sample_every = 1000
    c.train.eval_every = 1000
    c.train.eval_batches = 2
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 300
    c.sample.num = 8
    if arg == "tiny":
        tiny(c)
        c.variant = "tiny"
        c.model.out_channels = 4
        c.model.base_channels = 16
        c.latent.stats_batches = 2
        c.loss.num_timesteps = 100
        c.sample.steps = 10
        c.sample.preview_steps = 5
        c.sample.num = 4
    elif arg:
        raise ValueError(f"unknown config variant {arg!r}; known: 'tiny'")
    return c
