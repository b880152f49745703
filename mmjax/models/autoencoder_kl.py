"""The KL autoencoder of Stable Diffusion (diffusers' `AutoencoderKL`), NHWC.

Encoder: a 3×3 conv, then per entry of `block_out_channels` `layers_per_block` residual blocks
and (except the last) a stride-2 conv that pads one row and column at the bottom and right; a
middle of residual block, one-head self-attention, residual block; GroupNorm, SiLU and a 3×3 conv
to the posterior's mean and log-variance, and the 1×1 `quant_conv`. Decoder: the 1×1
`post_quant_conv`, a 3×3 conv, the same middle, per reversed entry `layers_per_block + 1`
residual blocks and (except the last) nearest 2× upsampling and a 3×3 conv; GroupNorm, SiLU and a
3×3 conv to the image. Every norm is GroupNorm over `norm_num_groups` with eps 1e-6.

`encode(x)` -> (mean, logvar) of the latent, `decode(z)` -> the image; images in [-1, 1]. A
diffusion model reads `scaling_factor * (z - shift_factor)` (SD 1.x/2.x: 0.18215, no shift).
`mmjax/interop` maps a diffusers checkpoint's tensors onto the parameter names here.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.layers import Attention, Dtype, GroupNorm32


class ResnetBlock(nn.Module):
    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(GroupNorm32(self.groups, self.eps, name="norm1", **kw)(x))
        h = nn.Conv(self.out_channels, (3, 3), name="conv1", **kw)(h)
        h = nn.silu(GroupNorm32(self.groups, self.eps, name="norm2", **kw)(h))
        h = nn.Conv(self.out_channels, (3, 3), name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), name="shortcut", **kw)(x)
        return x + h


class MidBlock(nn.Module):
    groups: int = 32
    eps: float = 1e-6
    attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels = x.shape[-1]
        x = ResnetBlock(channels, self.groups, self.eps, name="block1", **kw)(x)
        if self.attention:
            h = GroupNorm32(self.groups, self.eps, name="attn_norm", **kw)(x)
            x = x + Attention(1, name="attn", **kw)(h)
        return ResnetBlock(channels, self.groups, self.eps, name="block2", **kw)(x)


class Encoder(nn.Module):
    block_out_channels: Sequence[int]
    layers_per_block: int
    latent_channels: int
    groups: int = 32
    mid_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.Conv(self.block_out_channels[0], (3, 3), name="conv_in", **kw)(x.astype(self.dtype))
        last = len(self.block_out_channels) - 1
        for i, channels in enumerate(self.block_out_channels):
            for j in range(self.layers_per_block):
                h = ResnetBlock(channels, self.groups, name=f"down{i}_block{j}", **kw)(h)
            if i < last:
                h = jnp.pad(h, ((0, 0), (0, 1), (0, 1), (0, 0)))
                h = nn.Conv(channels, (3, 3), strides=(2, 2), padding="VALID", name=f"down{i}_sample", **kw)(h)
        h = MidBlock(self.groups, attention=self.mid_attention, name="mid", **kw)(h)
        h = nn.silu(GroupNorm32(self.groups, 1e-6, name="norm_out", **kw)(h))
        return nn.Conv(2 * self.latent_channels, (3, 3), name="conv_out", **kw)(h)


class Decoder(nn.Module):
    block_out_channels: Sequence[int]
    layers_per_block: int
    out_channels: int
    groups: int = 32
    mid_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels = list(reversed(self.block_out_channels))
        h = nn.Conv(channels[0], (3, 3), name="conv_in", **kw)(z)
        h = MidBlock(self.groups, attention=self.mid_attention, name="mid", **kw)(h)
        for i, width in enumerate(channels):
            for j in range(self.layers_per_block + 1):
                h = ResnetBlock(width, self.groups, name=f"up{i}_block{j}", **kw)(h)
            if i < len(channels) - 1:
                b, height, w, c = h.shape
                h = jax.image.resize(h, (b, 2 * height, 2 * w, c), "nearest")
                h = nn.Conv(width, (3, 3), name=f"up{i}_sample", **kw)(h)
        h = nn.silu(GroupNorm32(self.groups, 1e-6, name="norm_out", **kw)(h))
        return nn.Conv(self.out_channels, (3, 3), name="conv_out", **kw)(h)


class AutoencoderKL(nn.Module):
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    in_channels: int = 3
    out_channels: int = 3
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True  # SD 3 and Flux VAEs have neither 1x1 conv
    use_post_quant_conv: bool = True
    mid_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(self.block_out_channels, self.layers_per_block, self.latent_channels,
                               self.norm_num_groups, self.mid_attention, **kw)
        self.quant_conv = nn.Conv(2 * self.latent_channels, (1, 1), **kw) if self.use_quant_conv else None
        self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), **kw) if self.use_post_quant_conv else None
        self.decoder = Decoder(self.block_out_channels, self.layers_per_block, self.out_channels,
                               self.norm_num_groups, self.mid_attention, **kw)

    def encode(self, x):
        """Images `[B, H, W, 3]` in [-1, 1] -> the posterior's (mean, logvar), float32."""
        moments = self.encoder(x)
        moments = (moments if self.quant_conv is None else self.quant_conv(moments)).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        """Latents (unscaled) -> images, float32."""
        z = z.astype(self.dtype)
        return self.decoder(z if self.post_quant_conv is None else self.post_quant_conv(z)).astype(jnp.float32)

    def __call__(self, x, sample_key=None):
        """Reconstruction: decode the posterior mean (or a sample, given `sample_key`)."""
        mean, logvar = self.encode(x)
        z = mean if sample_key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(sample_key, mean.shape)
        return self.decode(z)
