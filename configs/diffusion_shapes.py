"""Text-to-image diffusion in pixel space on `shapes` (32x32), with classifier-free guidance.

    python train.py --config configs/diffusion_shapes.py --workdir runs/diffusion
    python train.py --config configs/diffusion_shapes.py:tiny --workdir runs/diffusion_tiny   # CPU smoke run
    python sample.py --workdir runs/diffusion --prompt "a large red circle at the top left" --out grid.png

Pixel space is the accelerator setting: on a 2-core CPU one step of the small UNet takes
seconds (see README). For a CPU-trainable text-to-image model use configs/ldm_shapes.py.
Variant `ddpm32` (the DDPM CIFAR-10 network, 35.7M parameters) is the benchmark shape.
"""

from mmjax.config import base_config, tiny
from mmjax.families.diffusion import add_defaults


def get_config(arg=None):
    c = base_config()
    c.family = "diffusion"
    c.variant = "small"
    add_defaults(c)
    c.train.num_steps = 20000
    c.train.sample_every = 1000
    c.train.eval_every = 1000
    c.train.eval_batches = 2
    c.train.checkpoint_every = 1000
    c.optim.warmup_steps = 500
    c.sample.num = 8
    if arg == "tiny":
        tiny(c)
        c.variant = "tiny"
        c.loss.num_timesteps = 100
        c.sample.steps = 10
        c.sample.preview_steps = 5
        c.sample.num = 4
    elif arg:
        raise ValueError(f"unknown config variant {arg!r}; known: 'tiny'")
    return c
