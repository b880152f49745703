"""An NHWC denoising UNet (DDPM/ADM layout) with timestep embedding and caption conditioning.

Layout: level `i` works at `H / 2**i` with `base_channels * channel_mults[i]` channels. Each
level has `num_res_blocks` ResBlocks, each optionally followed by self-attention (levels in
`attn_levels`) and cross-attention to the caption tokens (levels in `cross_attn_levels`); the
middle block is ResBlock, attention, ResBlock; the up path mirrors the down path with one extra
block per level that takes the skip from the downsampling conv.

Conditioning: the timestep's sinusoidal features go through a two-layer MLP; with a caption,
a projection of the TextEncoder's pooled vector is added to that embedding, which then drives
every ResBlock. Cross-attention reads the token context directly (its keys and values project
the text width to the feature width, so the two widths need not match).

The caption is encoded once per sample and the denoiser called many times:

    text = model.apply(variables, tokens, method=UNet.encode_text)
    eps = model.apply(variables, x, t, text, method=UNet.denoise)

The output conv starts at zero, so a fresh model predicts exactly 0 (the mean of the noise it
learns to predict), and the output is float32 whatever `dtype` is.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.layers import (
    Attention,
    Downsample,
    Dtype,
    GroupNorm32,
    ResBlock,
    SinusoidalEmbedding,
    Upsample,
)
from mmjax.models.text import TextEncoder, TextEncoderTiny


class AttentionBlock(nn.Module):
    """Residual `x + Attention(GroupNorm(x), context)`: self-attention when `context` is None.

    With a context and `mutable=["attention_maps"]`, its Attention sows the per-token
    cross-attention maps `[B, H, W, L]` (see layers.Attention; sampling/attention_maps.py
    turns them into per-word heat maps).
    """

    num_heads: int
    head_dim: int | None = None
    groups: int = 32
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, context_mask=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GroupNorm32(self.groups, name="norm", **kw)(x)
        if context is not None:
            context = context.astype(self.dtype)
        h = Attention(
            self.num_heads, self.head_dim, implementation=self.implementation, name="attn", **kw
        )(h, context, mask=context_mask)
        return x + h


class UNet(nn.Module):
    """NHWC denoising UNet with timestep embedding, self-attention and cross-attention to a caption."""

    out_channels: int = 3
    base_channels: int = 64
    channel_mults: Sequence[int] = (1, 2, 2)
    num_res_blocks: int = 2
    attn_levels: Sequence[int] = ()  # level indices (0 = input resolution) with self-attention
    cross_attn_levels: Sequence[int] = ()  # levels with cross-attention to the caption (needs text)
    mid_attention: bool = True  # self-attention (+ cross-attention with a caption) in the middle
    num_heads: int = 4
    head_dim: int | None = None  # None: width // num_heads at every level
    # Set: every level runs width // channels_per_head heads of that size instead of
    # `num_heads` (same parameters and FLOPs). Attention kernels run far faster on heads of
    # 64 than of 24 (BENCHMARKS.md: cuDNN at 64x64, 2.3x).
    channels_per_head: int | None = None
    dropout: float = 0.0
    norm_groups: int = 32
    # True: ADM's scale-and-shift FiLM; False: DDPM's additive bias (layers.ResBlock cond_mode).
    scale_shift_norm: bool = True
    text: Callable[..., TextEncoder] | None = None  # TextEncoder constructor; None = unconditional
    implementation: str | None = None  # every Attention's, the TextEncoder's included
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mults) - 1)

    def setup(self):
        levels = range(len(self.channel_mults))
        for name in ("attn_levels", "cross_attn_levels"):
            bad = [i for i in getattr(self, name) if i not in levels]
            if bad:
                raise ValueError(f"{name} {bad} out of range for {len(levels)} levels")
        if self.cross_attn_levels and self.text is None:
            raise ValueError("cross_attn_levels needs a text encoder (text=...)")
        self.text_encoder = (
            None
            if self.text is None
            else self.text(
                implementation=self.implementation, dtype=self.dtype, param_dtype=self.param_dtype
            )
        )

    def encode_text(self, tokens: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """Tokens `[B, L]` -> `{"context": [B, L, D], "mask": [B, L] bool, "pooled": [B, D]}`."""
        if self.text_encoder is None:
            raise ValueError("this UNet is unconditional (text=None); it reads no captions")
        context, aux = self.text_encoder(tokens, train=train)
        return {"context": context, "mask": aux["mask"], "pooled": aux["pooled"]}

    def __call__(self, x, t, tokens=None, train: bool = False) -> jax.Array:
        """`denoise(x, t, encode_text(tokens))`: noisy images, timesteps, caption -> float32."""
        if self.text is not None and tokens is None:
            raise ValueError("this UNet reads captions; pass tokens")
        text = None if tokens is None else self.encode_text(tokens, train)
        return self.denoise(x, t, text, train)

    @nn.compact
    def denoise(self, x, t, text=None, train: bool = False) -> jax.Array:
        """`x` `[B, H, W, C]`, `t` `[B]` (or a scalar) int or float, `text` from encode_text.

        Returns `[B, H, W, out_channels]` float32 (what it predicts is the family's business).
        """
        if self.text_encoder is not None and text is None:
            raise ValueError("this UNet reads captions; pass tokens (text=encode_text(tokens))")
        if self.text_encoder is None and text is not None:
            raise ValueError("this UNet is unconditional (text=None); it reads no captions")
        height, width = x.shape[1:3]
        factor = self.downsample_factor
        if height % factor or width % factor:
            raise ValueError(
                f"spatial size {height}x{width} is not divisible by {factor} "
                f"(2**(len(channel_mults) - 1) for {len(self.channel_mults)} levels)"
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        context = mask = None
        if text is not None:
            context, mask = text["context"], text["mask"]

        emb_dim = 4 * self.base_channels
        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        emb = SinusoidalEmbedding(self.base_channels)(t)
        emb = nn.Dense(emb_dim, name="time_embed1", **kw)(emb)
        emb = nn.Dense(emb_dim, name="time_embed2", **kw)(nn.silu(emb))
        if text is not None:
            pooled = text["pooled"].astype(self.dtype)
            emb = emb + nn.Dense(emb_dim, name="text_embed", **kw)(pooled)

        def res(features, name):
            return ResBlock(features, self.norm_groups, self.dropout,
                            cond_mode="film" if self.scale_shift_norm else "bias", name=name, **kw)

        def attend(h, name, self_attn, cross_attn):
            heads = self.num_heads
            if self.channels_per_head:
                if h.shape[-1] % self.channels_per_head:
                    raise ValueError(f"channels_per_head {self.channels_per_head} does not divide the "
                                     f"width {h.shape[-1]} at {name}")
                heads = h.shape[-1] // self.channels_per_head
            block = lambda suffix: AttentionBlock(  # noqa: E731
                heads, self.head_dim, self.norm_groups, self.implementation,
                name=f"{name}_{suffix}", **kw,
            )
            if self_attn:
                h = block("attn")(h)
            if cross_attn:
                h = block("cross_attn")(h, context, mask)
            return h

        widths = [self.base_channels * m for m in self.channel_mults]
        h = nn.Conv(self.base_channels, (3, 3), name="conv_in", **kw)(x.astype(self.dtype))
        skips = [h]
        for level, width in enumerate(widths):
            for i in range(self.num_res_blocks):
                h = res(width, f"down{level}_block{i}")(h, emb, train)
                h = attend(
                    h, f"down{level}_block{i}",
                    level in self.attn_levels, level in self.cross_attn_levels,
                )
                skips.append(h)
            if level < len(widths) - 1:
                h = Downsample(width, name=f"down{level}_sample", **kw)(h)
                skips.append(h)

        h = res(widths[-1], "mid_block1")(h, emb, train)
        h = attend(h, "mid", self.mid_attention, self.mid_attention and text is not None)
        h = res(widths[-1], "mid_block2")(h, emb, train)

        for level in reversed(range(len(widths))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop().astype(self.dtype)], axis=-1)
                h = res(widths[level], f"up{level}_block{i}")(h, emb, train)
                h = attend(
                    h, f"up{level}_block{i}",
                    level in self.attn_levels, level in self.cross_attn_levels,
                )
            if level > 0:
                h = Upsample(widths[level], name=f"up{level}_sample", **kw)(h)

        h = nn.silu(GroupNorm32(self.norm_groups, name="norm_out", **kw)(h))
        # Zero-initialised: the model starts by predicting 0, and in float32 because this conv
        # sets the values the loss is measured on.
        out = nn.Conv(
            self.out_channels, (3, 3), kernel_init=nn.initializers.zeros, name="conv_out",
            dtype=jnp.float32, param_dtype=self.param_dtype,
        )(h)
        return out.astype(jnp.float32)


UNetTiny = functools.partial(
    UNet, base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attn_levels=(1,),
    cross_attn_levels=(1,), norm_groups=8, text=TextEncoderTiny,
)
# Trains on a CPU at 32x32 pixels.
UNetSmall = functools.partial(
    UNet, base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1, attn_levels=(2,),
    cross_attn_levels=(1, 2), num_heads=4, text=TextEncoder,
)
# Latent diffusion on tiny latents (4x4x8 or 8x8x4); the config sets out_channels.
UNetLatentSmall = functools.partial(
    UNet, base_channels=128, channel_mults=(1, 2), num_res_blocks=2, attn_levels=(0, 1),
    cross_attn_levels=(0, 1), text=TextEncoder,
)
# Ho et al. (2020)'s CIFAR-10 network: 35.7M parameters, attention at 16x16 and in the middle.
DDPM32 = functools.partial(
    UNet, base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2, attn_levels=(1,),
    dropout=0.1, norm_groups=32, scale_shift_norm=False, text=None,
)
DDPM32Text = functools.partial(DDPM32, text=TextEncoder, cross_attn_levels=(1,))
# Text-to-image on 64x64x4 latents (LDM-style widths 192/384/768, 77-token captions), with
# heads of 64 channels (3 at 64x64, 6 at 32x32) as in Stable Diffusion 2.
LDM64 = functools.partial(
    UNet, out_channels=4, base_channels=192, channel_mults=(1, 2, 4), num_res_blocks=2,
    attn_levels=(0, 1), cross_attn_levels=(0, 1), channels_per_head=64,
    text=functools.partial(TextEncoder, width=512, depth=4, num_heads=8, max_len=77),
)
