"""A diffusion transformer (DiT, Peebles & Xie 2023) over patches of images or latents.

`x` `[B, H, W, C]` is cut into `patch_size`² patches, each a token of `width` channels plus a
fixed 2-D sin-cos position. The timestep's features and the caption's pooled vector make one
conditioning vector `c`, and every block modulates its norms by it with adaLN-Zero: a Dense of
`silu(c)` gives a shift, a scale and a gate per sub-layer, initialised at zero so that every
block starts as the identity. The caption's tokens reach the image in one of two ways
(`block`):

- "cross": self-attention over the image tokens, then cross-attention to the caption tokens
  (PixArt-α style), then an MLP;
- "joint": MMDiT (SD3) style. Caption and image tokens keep their own weights (norms,
  modulation, projections, MLP) but attend together in one attention over both sequences.

The blocks are one `nn.scan` (`scan=True`): their parameters are stacked along a leading depth
axis and the block is traced and compiled once, so compile time does not grow with depth.
`remat=True` recomputes each block's activations in the backward pass instead of keeping them.

The interface is the UNet's (models/unet.py), so the diffusion family drives either:

    text = model.apply(variables, tokens, method=DiT.encode_text)
    out = model.apply(variables, x, t, text, method=DiT.denoise)      # [B, H, W, out] float32

Attention maps: with `mutable=["attention_maps"]`, every block sows its image-to-caption
attention (mean over heads; a joint block's renormalised over the caption's columns) as
`[B, h, w, L]`; the scanned stack sows them stacked as `[depth, B, h, w, L]`.
"""
from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models.layers import MAPS, MLP, Attention, Dtype, SinusoidalEmbedding, attention, attention_with_weights
from mmjax.models.text import TextEncoder, TextEncoderTiny

BLOCKS = ("cross", "joint")


def sincos_2d(height: int, width: int, dim: int) -> np.ndarray:
    """Fixed `[height * width, dim]` positions: half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = 1.0 / 10_000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")

    def encode(pos):
        angles = pos.reshape(-1, 1) * freqs[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(rows), encode(cols)], axis=1).astype(np.float32)


def patchify(x: jax.Array, p: int) -> jax.Array:
    """`[B, H, W, C]` -> `[B, (H/p)(W/p), p*p*C]`, patches in row-major order."""
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height // p, p, width // p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, (height // p) * (width // p), p * p * channels)


def unpatchify(tokens: jax.Array, grid: tuple[int, int], p: int) -> jax.Array:
    """The inverse of `patchify`: `[B, h*w, p*p*C]` -> `[B, h*p, w*p, C]`."""
    batch, channels = tokens.shape[0], tokens.shape[-1] // (p * p)
    x = tokens.reshape(batch, grid[0], grid[1], p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, grid[0] * p, grid[1] * p, channels)


def _norm(x):
    """LayerNorm without its own scale and shift (adaLN supplies them), in float32."""
    return nn.LayerNorm(use_bias=False, use_scale=False, epsilon=1e-6, dtype=jnp.float32)(x)


def _modulate(x, shift, scale):
    return x * (1.0 + scale[:, None]) + shift[:, None]


def _modulation(c, count: int, name: str, kw):
    """`count` vectors of the block's width from `silu(c)`, by one zero-initialised Dense."""
    width = c.shape[-1]
    out = nn.Dense(count * width, kernel_init=nn.initializers.zeros, name=name, **kw)(nn.silu(c))
    return jnp.split(out.astype(jnp.float32), count, axis=-1)


class CrossBlock(nn.Module):
    """adaLN-Zero self-attention, gated cross-attention to the caption, adaLN-Zero MLP."""

    num_heads: int
    grid: tuple[int, int] = (1, 1)  # the patch grid (h, w): the shape a sown map comes out in
    mlp_ratio: float = 4.0
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, c, context, mask):
        grid = self.grid
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        (shift1, scale1, gate1, shift2, scale2, gate2, shift3, scale3, gate3) = _modulation(c, 9, "adaln", kw)
        attn = functools.partial(Attention, self.num_heads, implementation=self.implementation, **kw)
        h = _modulate(_norm(x), shift1, scale1).astype(self.dtype)
        x = x + gate1[:, None] * attn(name="self_attn")(h)
        if context is not None:
            h = _modulate(_norm(x), shift2, scale2).astype(self.dtype)
            # [B, h, w, D] queries, so that a sown map comes out [B, h, w, L].
            h = attn(name="cross_attn")(h.reshape(h.shape[0], *grid, h.shape[-1]), context, mask=mask)
            x = x + gate2[:, None] * h.reshape(x.shape)
        h = _modulate(_norm(x), shift3, scale3).astype(self.dtype)
        h = MLP(int(self.mlp_ratio * x.shape[-1]), name="mlp", **kw)(h)
        return x + gate3[:, None] * h


class JointBlock(nn.Module):
    """MMDiT block: image tokens `x` and caption tokens `y`, each with its own adaLN-Zero
    modulation, projections and MLP, attending together in one attention."""

    num_heads: int
    grid: tuple[int, int] = (1, 1)
    mlp_ratio: float = 4.0
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, y, c, mask):
        grid = self.grid
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width = x.shape[-1]
        head_dim = width // self.num_heads
        streams = {}
        for name, tokens in (("image", x), ("text", y)):
            mods = _modulation(c, 6, f"{name}_adaln", kw)
            h = _modulate(_norm(tokens), mods[0], mods[1]).astype(self.dtype)
            qkv = nn.DenseGeneral((3, self.num_heads, head_dim), name=f"{name}_qkv", **kw)(h)
            streams[name] = (mods, qkv)
        qkv = jnp.concatenate([streams["image"][1], streams["text"][1]], axis=1)  # [B, N + L, 3, H, d]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        n = x.shape[1]
        keys = jnp.concatenate([jnp.ones((x.shape[0], n), bool), mask], axis=1)
        if self.is_mutable_collection(MAPS) and not self.is_initializing():
            out, weights = attention_with_weights(q, k, v, keys)
            # Image queries on caption keys, renormalised over the caption (the rest of each
            # row went to image keys) so that the maps read like cross-attention maps.
            maps = weights[:, :, :n, n:].mean(axis=1)
            maps = maps / jnp.maximum(maps.sum(-1, keepdims=True), 1e-12)
            self.sow(MAPS, "weights", maps.reshape(maps.shape[0], *grid, maps.shape[-1]))
        else:
            out = attention(q, k, v, keys, self.implementation)
        outs = {"image": out[:, :n], "text": out[:, n:]}
        result = []
        for name, tokens in (("image", x), ("text", y)):
            mods = streams[name][0]
            h = nn.DenseGeneral(width, axis=(-2, -1), name=f"{name}_out", **kw)(outs[name])
            tokens = tokens + mods[2][:, None] * h
            h = _modulate(_norm(tokens), mods[3], mods[4]).astype(self.dtype)
            h = MLP(int(self.mlp_ratio * width), name=f"{name}_mlp", **kw)(h)
            result.append(tokens + mods[5][:, None] * h)
        return tuple(result)


class _ScanCross(nn.Module):
    """One scan step over CrossBlocks: carry = image tokens."""

    block: Callable[..., CrossBlock]

    @nn.compact
    def __call__(self, x, c, context, mask):
        return self.block(name="block")(x, c, context, mask), None


class _ScanJoint(nn.Module):
    """One scan step over JointBlocks: carry = (image tokens, caption tokens)."""

    block: Callable[..., JointBlock]

    @nn.compact
    def __call__(self, carry, c, mask):
        return self.block(name="block")(*carry, c, mask), None


class DiT(nn.Module):
    """Diffusion transformer with the UNet's interface (see the module docstring)."""

    out_channels: int = 4
    patch_size: int = 2
    width: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    block: str = "cross"  # "cross" (cross-attention) or "joint" (MMDiT joint attention)
    scan: bool = True  # one nn.scan over the blocks (compile once) or a Python loop
    remat: bool = False  # recompute block activations in the backward pass
    text: Callable[..., TextEncoder] | None = None  # TextEncoder constructor; None = unconditional
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def downsample_factor(self) -> int:
        return self.patch_size

    def setup(self):
        if self.block not in BLOCKS:
            raise ValueError(f"DiT block must be one of {BLOCKS}, got {self.block!r}")
        if self.width % self.num_heads:
            raise ValueError(f"DiT width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.block == "joint" and self.text is None:
            raise ValueError("a joint-attention DiT needs a text encoder (text=...)")
        self.text_encoder = (None if self.text is None else self.text(
            implementation=self.implementation, dtype=self.dtype, param_dtype=self.param_dtype))

    def encode_text(self, tokens: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """Tokens `[B, L]` -> `{"context": [B, L, D], "mask": [B, L] bool, "pooled": [B, D]}`."""
        if self.text_encoder is None:
            raise ValueError("this DiT is unconditional (text=None); it reads no captions")
        context, aux = self.text_encoder(tokens, train=train)
        return {"context": context, "mask": aux["mask"], "pooled": aux["pooled"]}

    def __call__(self, x, t, tokens=None, train: bool = False) -> jax.Array:
        if self.text is not None and tokens is None:
            raise ValueError("this DiT reads captions; pass tokens")
        text = None if tokens is None else self.encode_text(tokens, train)
        return self.denoise(x, t, text, train)

    @nn.compact
    def denoise(self, x, t, text=None, train: bool = False) -> jax.Array:
        """`x` `[B, H, W, C]`, `t` `[B]` (or a scalar), `text` from encode_text -> float32
        `[B, H, W, out_channels]`."""
        if self.text_encoder is not None and text is None:
            raise ValueError("this DiT reads captions; pass tokens (text=encode_text(tokens))")
        if self.text_encoder is None and text is not None:
            raise ValueError("this DiT is unconditional (text=None); it reads no captions")
        batch, height, width_px, _ = x.shape
        p = self.patch_size
        if height % p or width_px % p:
            raise ValueError(f"spatial size {height}x{width_px} is not divisible by patch_size {p}")
        grid = (height // p, width_px // p)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        h = nn.Dense(self.width, name="patch_embed", **kw)(patchify(x, p).astype(self.dtype))
        h = h.astype(jnp.float32) + sincos_2d(*grid, self.width)[None]

        t = jnp.broadcast_to(jnp.asarray(t), (batch,))
        c = SinusoidalEmbedding(256)(t)
        c = nn.Dense(self.width, name="time_embed1", **kw)(c)
        c = nn.Dense(self.width, name="time_embed2", **kw)(nn.silu(c)).astype(jnp.float32)
        context = mask = None
        if text is not None:
            c = c + nn.Dense(self.width, name="text_embed", **kw)(text["pooled"].astype(self.dtype)).astype(jnp.float32)
            context, mask = text["context"].astype(self.dtype), text["mask"]

        block_kw = dict(num_heads=self.num_heads, grid=grid, mlp_ratio=self.mlp_ratio, implementation=self.implementation, **kw)
        if self.block == "cross":
            block, step = functools.partial(CrossBlock, **block_kw), _ScanCross
            args, carry = (c, context, mask), h
        else:
            block, step = functools.partial(JointBlock, **block_kw), _ScanJoint
            y = nn.Dense(self.width, name="context_proj", **kw)(context).astype(jnp.float32)
            args, carry = (c, mask), (h, y)
        if self.remat:
            step = nn.remat(step, prevent_cse=not self.scan)
        if self.scan:
            stack = nn.scan(step, variable_axes={"params": 0, MAPS: 0}, split_rngs={"params": True},
                            in_axes=(nn.broadcast,) * len(args), length=self.depth)
            carry, _ = stack(block, name="blocks")(carry, *args)
        else:
            for i in range(self.depth):
                carry, _ = step(block, name=f"blocks_{i}")(carry, *args)
        h = carry if self.block == "cross" else carry[0]

        shift, scale = _modulation(c, 2, "final_adaln", kw)
        h = _modulate(_norm(h), shift, scale)
        # Zero-initialised and float32: a fresh model predicts exactly 0.
        out = nn.Dense(p * p * self.out_channels, kernel_init=nn.initializers.zeros, name="final",
                       dtype=jnp.float32, param_dtype=self.param_dtype)(h)
        return unpatchify(out, grid, p).astype(jnp.float32)


DiTTiny = functools.partial(DiT, patch_size=2, width=32, depth=2, num_heads=2, text=TextEncoderTiny)
# On the 4x4x8 latents of the shapes VAE: one token per latent position.
DiTShapes = functools.partial(DiT, patch_size=1, width=256, depth=6, num_heads=4, text=TextEncoder)
# The paper's sizes, for 32x32x4 latents (256x256 images) in the benchmark, with the text
# encoder of the LDM64 UNet (77-token captions).
_BENCH_TEXT = functools.partial(TextEncoder, width=512, depth=4, num_heads=8, max_len=77)
DiTS2 = functools.partial(DiT, patch_size=2, width=384, depth=12, num_heads=6, text=_BENCH_TEXT)
DiTB2 = functools.partial(DiT, patch_size=2, width=768, depth=12, num_heads=12, text=_BENCH_TEXT)
