"""CLIP on `shapes` (32x32): a ResNet image tower and the shared text encoder, contrastive loss
over the global batch.

    python train.py --config configs/clip_shapes.py --workdir runs/clip
    python train.py --config configs/clip_shapes.py:tiny --workdir runs/clip_tiny      # CPU smoke run
    python train.py --config configs/clip_shapes.py --workdir runs/siglip --config.loss.kind=siglip
    python -m mmjax.evaluate --workdir runs/clip      # zero-shot accuracy and retrieval recall

Variants: `small` (ResNet tower), `small_vit` (a 4-layer ViT on 4x4 patches), `64` (the 64x64
accelerator config, with --config.data.image_size=64).
"""

from mmjax.config import base_config, tiny
from mmjax.families.clip import add_defaults


def get_config(arg=None):
    c = base_config()
    c.family = "clip"
    c.variant = "small"
    add_defaults(c)
    c.train.batch_size = 128
    c.train.ema_decay = 0.99
    c.train.eval_every = 250
    c.train.checkpoint_every = 250
    c.optim.lr = 2e-3
    c.optim.weight_decay = 1e-4
    c.optim.warmup_steps = 200
    if arg == "tiny":
        tiny(c)
        c.variant = "tiny"
    elif arg:
        raise ValueError(f"unknown config variant {arg!r}; known: 'tiny'")
    return c
