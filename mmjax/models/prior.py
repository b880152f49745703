"""A learned conditional prior p(z | caption) for latent-variable generators.

With a fixed N(0, I) prior, a caption-conditioned VAE is free to put colour and shape into its
latent as well as reading them from the caption; prior samples then land where no training
latent lies and decode to blobs. A prior predicted from the caption makes that information
free to keep in z *and* puts samples where captions with those words put their latents.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.layers import Dtype

LOGVAR_RANGE = (-10.0, 4.0)


class TextPrior(nn.Module):
    """Pooled caption embedding `[B, D]` -> `(mean, logvar)` of shape `[B, *latent_shape]`, f32.

    The output layer starts at zero, so training begins from the standard normal prior.
    """

    hidden: int = 256
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pooled, latent_shape: tuple[int, ...]):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(nn.Dense(self.hidden, name="hidden1", **kw)(pooled.astype(self.dtype)))
        h = nn.silu(nn.Dense(self.hidden, name="hidden2", **kw)(h))
        size = math.prod(latent_shape)
        out = nn.Dense(2 * size, kernel_init=nn.initializers.zeros, name="out",
                       dtype=jnp.float32, param_dtype=self.param_dtype)(h.astype(jnp.float32))
        mean, logvar = jnp.split(out, 2, axis=-1)
        shape = (pooled.shape[0],) + tuple(latent_shape)
        return mean.reshape(shape), jnp.clip(logvar.reshape(shape), *LOGVAR_RANGE)
