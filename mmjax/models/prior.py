"""A learned conditional prior p(z | caption) for latent-variable generators.

With a fixed N(0, I) prior, a caption-conditioned VAE is free to put colour and shape into its
latent as well as reading them from the caption; prior samples then land where no training
latent lies and decode to blobs. A prior predicted from the caption makes that information
free to keep in z *and* puts samples where captions with those words put their latents.

The prior is a mixture of `components` diagonal Gaussians over the whole latent (one component
is one Gaussian, the closed-form case). A mixture lets one caption put its samples in several
separate places (an object "somewhere" is nine positions, not their average). With
`attention_pool`, learned queries also read the caption's tokens by attention, so a colour word
is not diluted in the mean over the caption's bytes.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.layers import Attention, Dtype

LOGVAR_RANGE = (-10.0, 4.0)


class TextPrior(nn.Module):
    """`(pooled [B, D], latent_shape, context, context_mask)` -> mixture parameters, float32:
    `{"mean", "logvar"}` `[B, K, *latent_shape]` and `"logits"` `[B, K]`.

    One component starts exactly at the standard normal prior (zero output layer); more
    components start at small distinct offsets so that they can separate.
    """

    hidden: int = 256
    components: int = 1
    attention_pool: bool = False
    pool_queries: int = 4
    num_heads: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pooled, latent_shape: tuple[int, ...], context=None, context_mask=None):
        if self.components < 1:
            raise ValueError("the prior needs at least one component (model.prior_components), "
                             f"got {self.components}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch = pooled.shape[0]
        features = pooled.astype(self.dtype)
        if self.attention_pool:
            if context is None:
                raise ValueError("TextPrior(attention_pool=True) needs the caption's token context")
            width = context.shape[-1]
            queries = self.param("pool_queries", nn.initializers.normal(0.02),
                                 (self.pool_queries, width), self.param_dtype)
            read = Attention(self.num_heads, name="pool_attn", **kw)(
                jnp.broadcast_to(queries.astype(self.dtype), (batch, self.pool_queries, width)),
                context.astype(self.dtype), mask=context_mask)
            features = jnp.concatenate([features, read.reshape(batch, -1)], axis=-1)
        h = nn.silu(nn.Dense(self.hidden, name="hidden1", **kw)(features))
        h = nn.silu(nn.Dense(self.hidden, name="hidden2", **kw)(h))
        size, k = math.prod(latent_shape), self.components
        out = nn.Dense(2 * k * size, kernel_init=nn.initializers.zeros, name="out",
                       dtype=jnp.float32, param_dtype=self.param_dtype)(h.astype(jnp.float32))
        mean, logvar = jnp.split(out.reshape(batch, k, 2 * size), 2, axis=-1)
        if k > 1:
            offsets = self.param("component_offsets", nn.initializers.normal(0.5), (k, size),
                                 self.param_dtype)
            mean = mean + offsets
            logits = nn.Dense(k, kernel_init=nn.initializers.zeros, name="logits",
                              dtype=jnp.float32, param_dtype=self.param_dtype)(h.astype(jnp.float32))
        else:
            logits = jnp.zeros((batch, 1), jnp.float32)
        shape = (batch, k) + tuple(latent_shape)
        return {"mean": mean.reshape(shape), "logvar": jnp.clip(logvar.reshape(shape), *LOGVAR_RANGE),
                "logits": logits}


def standard_normal(batch: int, latent_shape: tuple[int, ...]) -> dict:
    """N(0, I) in the mixture layout (one component)."""
    zeros = jnp.zeros((batch, 1) + tuple(latent_shape), jnp.float32)
    return {"mean": zeros, "logvar": zeros, "logits": jnp.zeros((batch, 1), jnp.float32)}


def log_prob(prior: dict, z) -> jax.Array:
    """log p(z) under the mixture, per example `[B]`; z is `[B, *latent_shape]`."""
    z = z[:, None].astype(jnp.float32)
    axes = tuple(range(2, z.ndim))
    per_component = -0.5 * jnp.sum(
        prior["logvar"] + jnp.square(z - prior["mean"]) * jnp.exp(-prior["logvar"]) + math.log(2 * math.pi),
        axis=axes)
    return jax.nn.logsumexp(jax.nn.log_softmax(prior["logits"], axis=-1) + per_component, axis=-1)


def kl(mean, logvar, prior: dict) -> jax.Array:
    """KL(q || p) per example `[B]` for q = N(mean, exp(logvar)) and the prior mixture.

    One component: the closed form. A mixture has none; this is the variational upper bound
    -log sum_k w_k exp(-KL(q || p_k)) (Hershey & Olsen, 2007), exact when one component holds
    all the weight. It is deterministic: a one-sample estimate log q(z) - log p(z) is unbiased,
    but its noise from the latent's unused dimensions swamps the prior's gradient, and the
    prior then stops following the caption's position words.
    """
    axes = tuple(range(2, mean.ndim + 1))
    mean, logvar = mean[:, None], logvar[:, None]
    pm, plv = prior["mean"], prior["logvar"]
    per_component = jnp.sum(
        0.5 * (plv - logvar + (jnp.exp(logvar) + jnp.square(mean - pm)) * jnp.exp(-plv) - 1.0), axis=axes)
    return -jax.nn.logsumexp(jax.nn.log_softmax(prior["logits"], axis=-1) - per_component, axis=-1)


def sample(prior: dict, rng, temperature: float = 1.0) -> jax.Array:
    """One z per example: a component drawn by its weight, then its Gaussian with the spread
    scaled by `temperature` (0: the chosen component's mean)."""
    pick, noise = jax.random.split(rng)
    k = jax.random.categorical(pick, prior["logits"], axis=-1)
    take = lambda x: jnp.take_along_axis(x, k.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]  # noqa: E731
    mean, logvar = take(prior["mean"]), take(prior["logvar"])
    return mean + temperature * jnp.exp(0.5 * logvar) * jax.random.normal(noise, mean.shape, jnp.float32)
