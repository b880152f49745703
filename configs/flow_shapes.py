"""Text-to-image flow matching with a diffusion transformer on `shapes`, on a frozen VAE's latents.

The VAE's latents (4x4x8) are the DiT's tokens, one per latent position (patch 1). Train or take
a VAE, then name it on the command line (a run directory or an export):

    python train.py --config configs/flow_shapes.py --workdir runs/dit --config.latent.vae_workdir=pretrained/vae_shapes
    python sample.py --workdir runs/dit --prompt "a large purple triangle at the bottom" --out grid.png

CPU smoke run, in pixel space (16x16, no VAE needed):

    python train.py --config configs/flow_shapes.py:tiny --workdir runs/dit_tiny

`--config.model.block=joint` switches cross-attention for MMDiT joint attention;
`--config.model.scan=False` unrolls the blocks; `--config.model.remat=True` recomputes them.
"""

from mmjax.config import base_config, tiny
from mmjax.families.flow import add_defaults


def get_config(arg=None):
    c = base_config()
    c.family = "flow"
    c.variant = "dit_shapes"
    add_defaults(c)
    c.model.out_channels = 8
    c.model.block = "cross"  # measured against "joint" in RESULTS.md
    c.model.scan = True  # blocks in one nn.scan: compile time independent of depth
    c.model.remat = False  # True: recompute block activations in the backward pass (memory)
    c.train.num_steps = 6000
    c.train.sample_every = 1000
    c.train.eval_every = 1000
    c.train.eval_batches = 2
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 300
    c.sample.num = 8
    if arg == "tiny":
        tiny(c)
        c.variant = "dit_tiny"
        c.model.out_channels = 3
        c.sample.steps = 5
        c.sample.preview_steps = 3
        c.sample.num = 4
    elif arg:
        raise ValueError(f"unknown config variant {arg!r}; known: 'tiny'")
    return c
