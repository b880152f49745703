"""The judge: a ResNet classifier of shape, color, size and position on `shapes`.

    python train.py --config configs/cnn_shapes.py --workdir runs/judge
    python train.py --config configs/cnn_shapes.py:tiny --workdir runs/judge_tiny   # CPU smoke run
"""

from mmjax.config import base_config, tiny


def get_config(arg=None):
    c = base_config()
    c.family = "cnn"
    c.variant = "small"
    # The judge must score the held-out (color, shape) pairs that generators never see, so it
    # trains on all 24: trained without them it mistook ~6% of their colors.
    c.data.heldout_in_train = True
    c.train.num_steps = 1500
    c.train.ema_decay = 0.99
    c.train.eval_batches = 8
    c.optim.lr = 2e-3
    c.optim.weight_decay = 1e-4
    if arg == "tiny":
        tiny(c)
        c.variant = "tiny"
    elif arg:
        raise ValueError(f"unknown config variant {arg!r}; known: 'tiny'")
    return c
