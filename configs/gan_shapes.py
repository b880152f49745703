"""Text-conditioned GAN on `shapes`: generation from a caption, inversion, prompt edits.

    python train.py --config configs/gan_shapes.py --workdir runs/gan
    python train.py --config configs/gan_shapes.py:tiny --workdir runs/gan_tiny   # CPU smoke run
    python train.py --config configs/gan_shapes.py:64 --workdir runs/gan64        # 64x64, accelerators
    python sample.py --workdir runs/gan --prompt "a small green square at the top" --out grid.png

`optim` trains the generator and `optim_d` the discriminator (two learning rates, TTUR).
"""

import ml_collections

from mmjax.config import base_config, tiny


def get_config(arg=None):
    c = base_config()
    c.family = "gan"
    c.variant = "small"
    # Small enough to train on a 2-core CPU (about 0.? s a step at batch 32).
    c.model.g_widths = (64, 32, 16)
    c.model.d_widths = (16, 32, 64)
    c.loss.mismatch_weight = 1.0  # hinge on real images with another example's caption
    c.loss.r1_gamma = 0.1
    c.loss.r1_every = 4  # lazy R1: every k steps, scaled by k
    # DiffAugment transforms, each applied with ADA's adaptive probability p. No flips: the
    # captions name left and right. Translation is kept small for the same reason: a shift of
    # a quarter of the image would move an object to the next named position.
    c.loss.augment = ("translation", "cutout", "color")
    c.loss.translation = 0.0625
    c.loss.ada_target = 0.6
    c.loss.ada_p_init = 0.0
    c.loss.ada_p_max = 0.8
    c.loss.ada_speed = 0.001  # change of p per step
    c.train.batch_size = 32
    c.train.num_steps = 6000
    c.train.eval_batches = 1
    c.optim.lr = 2e-4
    c.optim.b1 = 0.0
    c.optim.b2 = 0.99
    c.optim.grad_clip = 0.0
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    c.optim_d = ml_collections.ConfigDict(c.optim.to_dict())
    c.optim_d.lr = 4e-4
    c.sample.num = 8
    c.sample.truncation = 0.0  # 0 = off; else |z| coordinates truncated to this bound
    c.sample.invert_steps = 300
    c.sample.invert_lr = 0.05
    c.sample.invert_z_reg = 1e-3
    c.sample.invert_offset_reg = 1e-2
    # Edits keep the source caption in the stem and the 8x8 block (shape, place) and give the
    # target caption to the finer blocks (color): measured on runs/gan at step 3,500 (64 test
    # images), 0 / 1 / 2 / 3 source layers kept the shape in 52 / 47 / 70 / 70% of edits while
    # the new color fell from 88 / 88 / 81 to 34%.
    c.sample.edit_source_layers = 2
    if arg == "tiny":
        tiny(c)
        c.variant = "tiny"
        c.model.g_widths = (32, 16)
        c.model.d_widths = (16, 32)
        c.sample.num = 4
        c.sample.invert_steps = 20
        c.sample.edit_source_layers = 1
    elif arg == "64":
        c.variant = "64"
        c.model.g_widths = (512, 256, 128, 64)
        c.model.d_widths = (64, 128, 256, 512)
        c.data.image_size = 64
        c.train.batch_size = 128
    elif arg:
        raise ValueError(f"unknown config variant {arg!r}; known: 'tiny', '64'")
    return c
