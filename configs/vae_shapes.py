"""Text-conditioned VAE on `shapes`: reconstruction, generation from a caption, interpolation.

    python train.py --config configs/vae_shapes.py --workdir runs/vae
    python train.py --config configs/vae_shapes.py:tiny --workdir runs/vae_tiny   # CPU smoke run
    python sample.py --workdir runs/vae --prompt "a small green square at the top" --out grid.png
"""

from mmjax.config import base_config, tiny


def get_config(arg=None):
    c = base_config()
    c.family = "vae"
    c.variant = "cond_small"
    # A 4x4x8 latent (128 numbers): small enough for prior samples to look like data, enough
    # for sharp reconstructions of one object.
    c.model.widths = (32, 64, 128, 128)
    c.model.latent_channels = 8
    # p(z | caption): a mixture of 16 Gaussians whose parameters also read the caption's
    # tokens by attention (see models/prior.py).
    c.model.prior_components = 16
    c.model.prior_attention = True
    c.loss.beta = 0.5
    c.loss.kl_warmup_steps = 500
    c.train.num_steps = 4000
    c.train.ema_decay = 0.995
    c.optim.lr = 2e-3
    c.sample.num = 8
    if arg == "tiny":
        tiny(c)
        c.variant = "cond_tiny"
        c.model.widths = (8, 16)
        c.model.latent_channels = 4
        c.model.prior_components = 2
        c.loss.kl_warmup_steps = 5
        c.sample.num = 4
    elif arg:
        raise ValueError(f"unknown config variant {arg!r}; known: 'tiny'")
    return c
