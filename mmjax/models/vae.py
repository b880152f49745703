"""A convolutional VAE with a spatial latent, optionally conditioned on a caption.

Layout: `widths` lists the channel count of each resolution level, so a `S x S` image maps to
a `S / 2**(len(widths) - 1)` square latent with `latent_channels` channels (32 px with
widths (32, 64, 128) -> 8 x 8 x 4).

Text conditioning (`text` is a TextEncoder constructor): one TextEncoder, shared by encoder
and decoder, embeds the caption; its pooled vector drives FiLM in *every* ResBlock of both
halves, and with `cross_attention` both halves also attend to the token context at the lowest
resolution. Conditioning the encoder too makes this a conditional VAE: the latent only has to
carry what the caption does not say, so at sampling time `decode(z ~ p(z | caption), tokens)` takes
colour and shape from the caption.

The decoder output is unbounded (a linear conv, float32), not tanh: the data sits exactly at
+-1 on flat backgrounds and tanh would need infinite pre-activations there, which slows
training and hurts PSNR. Clip to [-1, 1] for display and metrics.

Call the parts with `model.apply(params, images, method=VAE.encode)` and
`model.apply(params, z, tokens, method=VAE.decode)`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.layers import Attention, Downsample, Dtype, GroupNorm32, ResBlock, Upsample
from mmjax.models.prior import TextPrior, standard_normal
from mmjax.models.text import TextEncoder, TextEncoderTiny

# Keeps exp(logvar) finite and away from exactly zero even when the KL weight is tiny.
LOGVAR_RANGE = (-20.0, 10.0)


class _CrossAttentionBlock(nn.Module):
    """Residual cross-attention of a feature map to the caption tokens."""

    num_heads: int
    groups: int
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, context_mask):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GroupNorm32(self.groups, name="norm", **kw)(x)
        h = Attention(self.num_heads, implementation=self.implementation, name="attn", **kw)(
            h, context.astype(self.dtype), mask=context_mask
        )
        return x + h


class VAEEncoder(nn.Module):
    """Images -> `(mean, logvar)` of the latent posterior, both float32."""

    latent_channels: int
    widths: tuple[int, ...]
    blocks_per_stage: int
    groups: int
    dropout: float = 0.0
    cross_attention: bool = False
    num_heads: int = 4
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images, cond=None, context=None, context_mask=None, train=False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        res = lambda w, name: ResBlock(w, self.groups, self.dropout, name=name, **kw)  # noqa: E731
        x = nn.Conv(self.widths[0], (3, 3), name="conv_in", **kw)(images.astype(self.dtype))
        for level, width in enumerate(self.widths):
            if level > 0:
                x = Downsample(x.shape[-1], name=f"down{level}", **kw)(x)
            for block in range(self.blocks_per_stage):
                x = res(width, f"level{level}_block{block}")(x, cond, train)
        x = res(self.widths[-1], "mid_block")(x, cond, train)
        if self.cross_attention and context is not None:
            x = _CrossAttentionBlock(
                self.num_heads, self.groups, self.implementation, name="mid_cross_attn", **kw
            )(x, context, context_mask)
        x = nn.silu(GroupNorm32(self.groups, name="norm_out", **kw)(x))
        moments = nn.Conv(
            2 * self.latent_channels, (3, 3), name="conv_out", dtype=jnp.float32,
            param_dtype=self.param_dtype,
        )(x)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)


class VAEDecoder(nn.Module):
    """Latent `[B, s, s, latent_channels]` -> images `[B, S, S, out_channels]` float32."""

    out_channels: int
    widths: tuple[int, ...]
    blocks_per_stage: int
    groups: int
    dropout: float = 0.0
    cross_attention: bool = False
    num_heads: int = 4
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z, cond=None, context=None, context_mask=None, train=False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        res = lambda w, name: ResBlock(w, self.groups, self.dropout, name=name, **kw)  # noqa: E731
        x = nn.Conv(self.widths[-1], (3, 3), name="conv_in", **kw)(z.astype(self.dtype))
        x = res(self.widths[-1], "mid_block")(x, cond, train)
        if self.cross_attention and context is not None:
            x = _CrossAttentionBlock(
                self.num_heads, self.groups, self.implementation, name="mid_cross_attn", **kw
            )(x, context, context_mask)
        for level in reversed(range(len(self.widths))):
            for block in range(self.blocks_per_stage):
                x = res(self.widths[level], f"level{level}_block{block}")(x, cond, train)
            if level > 0:
                x = Upsample(x.shape[-1], name=f"up{level}", **kw)(x)
        x = nn.silu(GroupNorm32(self.groups, name="norm_out", **kw)(x))
        # Final projection in float32: it sets the pixel values that PSNR is measured on.
        out = nn.Conv(
            self.out_channels, (3, 3), name="conv_out", dtype=jnp.float32,
            param_dtype=self.param_dtype,
        )(x)
        return out.astype(jnp.float32)


class VAE(nn.Module):
    """`__call__(images, tokens=None, sample_posterior=True, train=False) -> (recon, aux)`.

    aux: `mean`, `logvar`, `z` (all float32, latent-shaped) and `prior` (see `prior`). The
    posterior sample uses the 'noise' rng stream. `tokens` is required iff `text` is set.
    """

    latent_channels: int = 4
    widths: tuple[int, ...] = (32, 64, 128)
    blocks_per_stage: int = 1
    groups: int = 8
    out_channels: int = 3
    dropout: float = 0.0
    text: Callable[..., TextEncoder] | None = None
    # Learned p(z | caption) (see models/prior.py); needs `text`. Off: the prior is N(0, I).
    learned_prior: bool = False
    prior_hidden: int = 256
    prior_components: int = 1  # mixture components of the learned prior
    prior_attention: bool = False  # the prior also reads the caption's tokens by attention
    cross_attention: bool = False
    num_heads: int = 4
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.widths) - 1)

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shared = dict(
            widths=self.widths,
            blocks_per_stage=self.blocks_per_stage,
            groups=self.groups,
            dropout=self.dropout,
            cross_attention=self.cross_attention,
            num_heads=self.num_heads,
            implementation=self.implementation,
            **kw,
        )
        self.text_encoder = None if self.text is None else self.text(**kw)
        if self.learned_prior and self.text is None:
            raise ValueError("learned_prior=True needs a text encoder (text=...)")
        self.prior_net = (TextPrior(self.prior_hidden, self.prior_components, self.prior_attention,
                                    num_heads=self.num_heads, **kw)
                          if self.learned_prior else None)
        self.encoder = VAEEncoder(self.latent_channels, **shared)
        self.decoder = VAEDecoder(self.out_channels, **shared)

    def _condition(self, tokens, train) -> dict[str, Any]:
        if self.text_encoder is None:
            if tokens is not None:
                raise ValueError("this VAE has no text encoder (text=None) but got tokens")
            return {}
        if tokens is None:
            raise ValueError("a text-conditioned VAE needs tokens")
        context, aux = self.text_encoder(tokens, train=train)
        return {"cond": aux["pooled"], "context": context, "context_mask": aux["mask"]}

    def encode(self, images, tokens=None, train: bool = False):
        """Images (and caption) -> `(mean, logvar)`, float32, logvar clipped to LOGVAR_RANGE."""
        return self.encoder(images, train=train, **self._condition(tokens, train))

    def decode(self, z, tokens=None, train: bool = False):
        """Latent (and caption) -> images, float32, roughly in [-1, 1] (not clipped)."""
        return self.decoder(z, train=train, **self._condition(tokens, train))

    def __call__(self, images, tokens=None, sample_posterior: bool = True, train: bool = False):
        # The caption is encoded once and shared by both halves.
        cond = self._condition(tokens, train)
        mean, logvar = self.encoder(images, train=train, **cond)
        z = mean
        if sample_posterior:
            eps = jax.random.normal(self.make_rng("noise"), mean.shape, jnp.float32)
            z = mean + jnp.exp(0.5 * logvar) * eps
        recon = self.decoder(z, train=train, **cond)
        aux = {"mean": mean, "logvar": logvar, "z": z}
        aux["prior"] = self._prior(cond, images.shape[0], mean.shape[1:])
        return recon, aux

    def _prior(self, cond, batch: int, latent_shape) -> dict:
        if self.prior_net is None:
            return standard_normal(batch, latent_shape)
        return self.prior_net(cond["cond"], tuple(latent_shape), cond["context"], cond["context_mask"])

    def prior(self, tokens, latent_shape: tuple[int, int, int], train: bool = False) -> dict:
        """p(z | caption) as a mixture (models/prior.py): `mean`, `logvar` `[B, K, *latent_shape]`
        and `logits` `[B, K]`, float32. Without a learned prior: N(0, I), one component."""
        if self.prior_net is None:
            return standard_normal(tokens.shape[0], latent_shape)
        return self._prior(self._condition(tokens, train), tokens.shape[0], latent_shape)


VAETiny = functools.partial(VAE, latent_channels=4, widths=(8, 16), groups=4, num_heads=2)
VAESmall = functools.partial(VAE, latent_channels=4, widths=(32, 64, 128), groups=8)
VAE64 = functools.partial(
    VAE, latent_channels=4, widths=(64, 128, 256, 256), blocks_per_stage=2, groups=32
)

# Caption-conditioned variants: FiLM everywhere plus cross-attention at the latent resolution.
CondVAETiny = functools.partial(VAETiny, text=TextEncoderTiny, cross_attention=True, learned_prior=True)
CondVAESmall = functools.partial(VAESmall, text=TextEncoder, cross_attention=True, learned_prior=True)
CondVAE64 = functools.partial(
    VAE64, text=functools.partial(TextEncoder, width=256, depth=4, num_heads=8),
    cross_attention=True, learned_prior=True,
)
