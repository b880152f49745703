"""The conditional UNet of Stable Diffusion 1.x and 2.x (diffusers' `UNet2DConditionModel`), NHWC.

Its fields are diffusers' config keys, so a checkpoint's `unet/config.json` builds it directly
(`mmjax/interop/sd_unet.py` translates and checks them):

- a sinusoidal timestep embedding (`flip_sin_to_cos`, `freq_shift`) through two Dense layers;
- down blocks of `layers_per_block` residual blocks, each followed in a `CrossAttnDownBlock2D` by
  a spatial transformer (GroupNorm, a 1×1 conv or, with `use_linear_projection`, a Dense in, then
  `transformer_layers_per_block` blocks of self-attention, cross-attention to the text and a
  GEGLU MLP, each after a LayerNorm, then the projection out and a residual), and a stride-2 conv
  except in the last block;
- a middle of residual block, spatial transformer, residual block;
- up blocks of `layers_per_block + 1` residual blocks, each reading the matching down-path state
  concatenated to its input, with transformers in `CrossAttnUpBlock2D`, and nearest upsampling (2×,
  or to the skip's size when the latents are not a multiple of 2^levels) and a conv except in the last;
- GroupNorm, SiLU and a 3×3 conv out.

`attention_head_dim` is, as in diffusers' SD configs, the number of heads (an int or one per
block); each head has `channels / heads` dimensions. Attention runs through `layers.attention`
(cuDNN's flash kernel where eligible), so `upcast_attention` is accepted and the softmax is float32
anyway. `__call__(x, t, context)` -> the predicted noise (or v), float32.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models.layers import Attention, Dtype, GroupNorm32, LayerNorm32

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")


def timestep_embedding(t, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> jax.Array:
    """diffusers' `get_timestep_embedding`: sin and cos of t at `dim / 2` geometric frequencies."""
    half = dim // 2
    exponent = -jnp.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class ResnetBlock(nn.Module):
    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(GroupNorm32(self.groups, self.eps, name="norm1", **kw)(x))
        h = nn.Conv(self.out_channels, (3, 3), name="conv1", **kw)(h)
        h = h + nn.Dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb))[:, None, None, :]
        h = nn.silu(GroupNorm32(self.groups, self.eps, name="norm2", **kw)(h))
        h = nn.Conv(self.out_channels, (3, 3), name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), name="shortcut", **kw)(x)
        return x + h


class TransformerBlock(nn.Module):
    """LayerNorm + self-attention, LayerNorm + cross-attention, LayerNorm + GEGLU MLP."""

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = lambda name: Attention(self.num_heads, implementation=self.implementation, name=name, **kw)  # noqa: E731
        x = x + attn("attn1")(LayerNorm32(1e-5, name="norm1", **kw)(x))
        x = x + attn("attn2")(LayerNorm32(1e-5, name="norm2", **kw)(x), context)
        h = LayerNorm32(1e-5, name="norm3", **kw)(x)
        width = x.shape[-1]
        hidden, gate = jnp.split(nn.Dense(8 * width, name="ff_in", **kw)(h), 2, axis=-1)
        h = hidden * jax.nn.gelu(gate, approximate=False)
        return x + nn.Dense(width, name="ff_out", **kw)(h)


class SpatialTransformer(nn.Module):
    num_heads: int
    depth: int = 1
    linear_projection: bool = False
    groups: int = 32
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, height, width, channels = x.shape
        h = GroupNorm32(self.groups, 1e-6, name="norm", **kw)(x)
        if self.linear_projection:
            h = nn.Dense(channels, name="proj_in", **kw)(h.reshape(batch, height * width, channels))
        else:
            h = nn.Conv(channels, (1, 1), name="proj_in", **kw)(h).reshape(batch, height * width, channels)
        for i in range(self.depth):
            h = TransformerBlock(self.num_heads, implementation=self.implementation, name=f"block{i}", **kw)(h, context)
        if self.linear_projection:
            h = nn.Dense(channels, name="proj_out", **kw)(h).reshape(batch, height, width, channels)
        else:
            h = nn.Conv(channels, (1, 1), name="proj_out", **kw)(h.reshape(batch, height, width, channels))
        return x + h


def _nearest(x, size) -> jax.Array:
    """Nearest-neighbour resize of `[B, H, W, C]` to `size`, picking source row floor(i * H / h)
    as PyTorch's `interpolate(mode="nearest")` does (an exact repeat when doubling)."""
    rows = (np.arange(size[0]) * x.shape[1]) // size[0]
    cols = (np.arange(size[1]) * x.shape[2]) // size[1]
    return x[:, rows][:, :, cols]


def _per_block(value, count: int, name: str) -> tuple:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * count
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries for {count} blocks")
    return values


class SDUNet(nn.Module):
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    down_block_types: Sequence[str] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: Sequence[str] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    attention_head_dim: int | Sequence[int] = 8
    transformer_layers_per_block: int | Sequence[int] = 1
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @nn.compact
    def __call__(self, x, t, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        levels = len(self.block_out_channels)
        heads = _per_block(self.attention_head_dim, levels, "attention_head_dim")
        depths = _per_block(self.transformer_layers_per_block, levels, "transformer_layers_per_block")
        for name, kinds, allowed in (("down_block_types", self.down_block_types, DOWN_BLOCKS),
                                     ("up_block_types", self.up_block_types, UP_BLOCKS)):
            if len(kinds) != levels or any(k not in allowed for k in kinds):
                raise ValueError(f"{name} must be {levels} of {allowed}, got {tuple(kinds)}")
        groups, eps = self.norm_num_groups, self.norm_eps
        transformer = lambda n, d, name: SpatialTransformer(  # noqa: E731
            n, d, self.use_linear_projection, groups, self.implementation, name=name, **kw)

        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        temb = timestep_embedding(t, self.block_out_channels[0], self.flip_sin_to_cos, self.freq_shift)
        temb = nn.Dense(4 * self.block_out_channels[0], name="time_linear_1", **kw)(temb.astype(self.dtype))
        temb = nn.Dense(4 * self.block_out_channels[0], name="time_linear_2", **kw)(nn.silu(temb))
        context = context.astype(self.dtype)

        h = nn.Conv(self.block_out_channels[0], (3, 3), name="conv_in", **kw)(x.astype(self.dtype))
        skips = [h]
        for i, (kind, channels) in enumerate(zip(self.down_block_types, self.block_out_channels)):
            for j in range(self.layers_per_block):
                h = ResnetBlock(channels, groups, eps, name=f"down{i}_res{j}", **kw)(h, temb)
                if kind == "CrossAttnDownBlock2D":
                    h = transformer(heads[i], depths[i], f"down{i}_attn{j}")(h, context)
                skips.append(h)
            if i < levels - 1:
                h = nn.Conv(channels, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name=f"down{i}_sample", **kw)(h)
                skips.append(h)

        h = ResnetBlock(self.block_out_channels[-1], groups, eps, name="mid_res0", **kw)(h, temb)
        h = transformer(heads[-1], depths[-1], "mid_attn")(h, context)
        h = ResnetBlock(self.block_out_channels[-1], groups, eps, name="mid_res1", **kw)(h, temb)

        up_channels, up_heads, up_depths = (list(reversed(v)) for v in (self.block_out_channels, heads, depths))
        for i, (kind, channels) in enumerate(zip(self.up_block_types, up_channels)):
            for j in range(self.layers_per_block + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = ResnetBlock(channels, groups, eps, name=f"up{i}_res{j}", **kw)(h, temb)
                if kind == "CrossAttnUpBlock2D":
                    h = transformer(up_heads[i], up_depths[i], f"up{i}_attn{j}")(h, context)
            if i < levels - 1:
                # To the size of the skip that comes next: twice this one, or one less where a
                # downsampling conv rounded an odd size up (latents not a multiple of 2^levels).
                h = _nearest(h, skips[-1].shape[1:3])
                h = nn.Conv(channels, (3, 3), name=f"up{i}_sample", **kw)(h)

        h = nn.silu(GroupNorm32(groups, eps, name="norm_out", **kw)(h))
        return nn.Conv(self.out_channels, (3, 3), name="conv_out", dtype=jnp.float32,
                       param_dtype=self.param_dtype)(h).astype(jnp.float32)
