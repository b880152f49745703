"""Shared building blocks for every model family.

All modules carry `dtype` (compute) and `param_dtype` (storage) and forward both to their
children. Normalisation statistics and attention softmax run in float32 whatever `dtype` is,
because bfloat16 has too few mantissa bits for a variance over thousands of activations.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def _num_groups(groups: int, channels: int) -> int:
    # Tiny test variants have fewer channels than the configured group count; falling back to a
    # divisor keeps one `groups` setting usable across all widths instead of erroring.
    return math.gcd(groups, channels)


class GroupNorm32(nn.Module):
    """GroupNorm whose statistics and affine run in float32; output is cast to `dtype`."""

    groups: int = 32
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        norm = nn.GroupNorm(
            num_groups=_num_groups(self.groups, x.shape[-1]),
            epsilon=self.epsilon,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
        )
        return norm(x.astype(jnp.float32)).astype(self.dtype)


class LayerNorm32(nn.Module):
    """LayerNorm computed in float32; output is cast to `dtype`."""

    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        norm = nn.LayerNorm(epsilon=self.epsilon, dtype=jnp.float32, param_dtype=self.param_dtype)
        return norm(x.astype(jnp.float32)).astype(self.dtype)


class ResBlock(nn.Module):
    """Pre-activation residual block (GroupNorm, SiLU, conv) x 2 with optional FiLM.

    `cond` is a vector `[B, C]` (a timestep embedding, a pooled caption, ...). With
    `cond_mode="film"` (ADM) it becomes a per-channel scale and shift applied after the second
    norm; that Dense starts at zero so a conditioned block begins as the plain block, which
    keeps early training stable. With `cond_mode="bias"` (DDPM) it is a per-channel bias added
    before the second norm: half the parameters, as in the 35.7M DDPM CIFAR-10 network.
    """

    features: int
    groups: int = 32
    dropout: float = 0.0
    cond_mode: str = "film"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array | None = None, train: bool = False):
        conv = lambda name: nn.Conv(  # noqa: E731
            self.features, (3, 3), dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        norm = lambda name: GroupNorm32(  # noqa: E731
            self.groups, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        h = conv("conv1")(nn.silu(norm("norm1")(x)))
        if self.cond_mode not in ("film", "bias"):
            raise ValueError(f"cond_mode must be 'film' or 'bias', got {self.cond_mode!r}")
        if cond is not None and self.cond_mode == "bias":
            bias = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                            name="cond_proj")(nn.silu(cond.astype(self.dtype)))
            h = h + bias[:, None, None, :]
        h = norm("norm2")(h)
        if cond is not None and self.cond_mode == "film":
            film = nn.Dense(
                2 * self.features,
                kernel_init=nn.initializers.zeros,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="film",
            )(nn.silu(cond.astype(self.dtype)))
            scale, shift = jnp.split(film[:, None, None, :], 2, axis=-1)
            h = h * (1 + scale) + shift
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
        h = conv("conv2")(h)
        if x.shape[-1] != self.features:
            x = nn.Conv(
                self.features, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype, name="skip"
            )(x)
        return x.astype(self.dtype) + h


class Downsample(nn.Module):
    """Halves H and W with a stride-2 3x3 conv (learned, unlike pooling)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Conv(
            self.features, (3, 3), strides=(2, 2), dtype=self.dtype, param_dtype=self.param_dtype
        )(x)


class Upsample(nn.Module):
    """Doubles H and W: nearest-neighbour repeat then a 3x3 conv (no checkerboard artefacts)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return nn.Conv(self.features, (3, 3), dtype=self.dtype, param_dtype=self.param_dtype)(x)


CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
MAPS = "attention_maps"  # the collection cross-attention sows its probabilities into


def _pad_axis1(x, pad):
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))


def _cudnn_attention(q, k, v, mask):
    """cuDNN flash attention. Its fused kernel takes a key mask only as a full `[B, 1, T, S]`
    additive bias, with even T and S in training: odd queries are padded (and the extra row
    dropped), odd keys padded and masked out, and the mask broadcast."""
    batch, length, keys = q.shape[0], q.shape[1], k.shape[1]
    q_pad, k_pad = length % 2, keys % 2
    if mask is not None or q_pad or k_pad:
        if mask is None:
            mask = jnp.ones((batch, 1, 1, keys), bool)
        q, k, v = _pad_axis1(q, q_pad), _pad_axis1(k, k_pad), _pad_axis1(v, k_pad)
        mask = jnp.broadcast_to(mask, mask.shape[:2] + (length, keys))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, q_pad), (0, k_pad)))
        mask = mask | ~jnp.any(mask, axis=-1, keepdims=True)  # the padded query row attends too
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    return out[:, :length]


def _key_mask(mask):
    """`[B, S]` or broadcastable mask -> `[B, heads|1, T|1, S]` bool in which a query with
    every key masked attends to all keys (one rule for every attention path)."""
    if mask is None:
        return None
    mask = jnp.asarray(mask, bool)
    if mask.ndim == 2:
        mask = mask[:, None, None, :]
    return mask | ~jnp.any(mask, axis=-1, keepdims=True)


def attention_with_weights(q, k, v, mask=None) -> tuple[jax.Array, jax.Array]:
    """`attention` computed explicitly: (output `[B, T, heads, d]` in `q`'s dtype, the float32
    probabilities `[B, heads, T, S]`).

    The fused kernels never materialise the probabilities, so this path exists only for
    callers that need them (cross-attention maps); it costs a `[B, heads, T, S]` float32
    array and runs in float32 whatever the inputs' dtype. Same masking rule as `attention`.
    """
    logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32))
    logits = logits / math.sqrt(q.shape[-1])
    mask = _key_mask(mask)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhts,bshd->bthd", weights, v.astype(jnp.float32))
    return out.astype(q.dtype), weights


def attention(q, k, v, mask=None, implementation: str | None = None) -> jax.Array:
    """`softmax(q k^T / sqrt(d)) v` over `[B, T, heads, d]` queries and `[B, S, heads, d]` keys.

    `mask`: `[B, S]` key mask (True = attend) or anything broadcastable to `[B, heads, T, S]`.
    A query with every key masked (an all-padding caption) attends to all keys instead of
    producing a backend-dependent NaN; callers ignore such rows anyway.

    `implementation=None` runs cuDNN's flash attention where it is eligible (an NVIDIA GPU,
    bfloat16/float16, a head dim the kernel takes: JAX checks while tracing) and XLA's
    attention otherwise; 'xla' or 'cudnn' force one. Whichever ran is visible in the compiled
    HLO as a `__cudnn$fmha` custom call (`mmjax.bench` counts them).
    """
    mask = _key_mask(mask)
    if implementation not in (None, "xla", "cudnn"):
        raise ValueError(f"attention implementation must be None, 'xla' or 'cudnn', got {implementation!r}")
    if implementation == "cudnn":
        return _cudnn_attention(q, k, v, mask)
    if implementation is None and jax.default_backend() == "gpu" and q.dtype in CUDNN_DTYPES:
        try:
            return _cudnn_attention(q, k, v, mask)
        except (NotImplementedError, ValueError, RuntimeError, TypeError):
            pass  # not eligible here (head dim, cuDNN version, ROCm ...): XLA's attention
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def rotary(x: jax.Array, base: float = 10_000.0) -> jax.Array:
    """Rotary position embedding of `[B, L, heads, d]` queries or keys (d even): channel pair
    (i, i + d/2) of position p rotated by the angle p * base^(-2i/d), in float32. Dot products
    of rotated queries and keys then depend on positions only through their difference."""
    dim = x.shape[-1]
    if dim % 2:
        raise ValueError(f"rotary positions need an even head dim, got {dim}")
    half = dim // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * freqs[None, :]
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


class Attention(nn.Module):
    """Multi-head attention: self-attention when `context` is None, cross-attention otherwise.

    `x` is `[B, ..., D]`; the middle axes (e.g. H, W of a feature map) are flattened into one
    sequence and restored afterwards. `mask` is a `[B, M]` boolean key mask (True = attend) or
    anything `jax.nn.dot_product_attention` accepts (broadcastable to `[B, heads, N, M]`).
    `implementation`: None picks the fastest eligible kernel (see `attention`), 'xla' or
    'cudnn' force one.

    Cross-attention maps: when the "attention_maps" collection is mutable
    (`apply(..., mutable=["attention_maps"])`), a cross-attention layer computes its
    probabilities explicitly (`attention_with_weights`) and sows their mean over heads as
    `attention_maps/.../weights`, a tuple of float32 `[B, ..., M]` arrays (the query's middle
    axes restored, e.g. `[B, H, W, M]` for a feature map). The choice is made while tracing,
    so a call without that collection compiles exactly the fused path and sows nothing.
    `init` never sows, so the maps never land in a model's variables.

    `rotary`: self-attention rotates queries and keys by their positions (`rotary`), so
    attention sees relative, not absolute, positions.
    """

    num_heads: int
    head_dim: int | None = None
    out_features: int | None = None
    implementation: str | None = None
    rotary: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, context: jax.Array | None = None, mask: jax.Array | None = None
    ) -> jax.Array:
        shape = x.shape
        x = x.reshape(shape[0], -1, shape[-1])
        cross = context is not None
        context = context if cross else x
        head_dim = self.head_dim or shape[-1] // self.num_heads
        proj = lambda name: nn.DenseGeneral(  # noqa: E731
            (self.num_heads, head_dim), dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        q, k, v = proj("query")(x), proj("key")(context), proj("value")(context)
        if self.rotary:
            if cross:
                raise ValueError("rotary positions apply to self-attention only")
            q, k = rotary(q), rotary(k)
        if cross and self.is_mutable_collection(MAPS) and not self.is_initializing():
            out, weights = attention_with_weights(q, k, v, mask)
            maps = weights.mean(axis=1)
            self.sow(MAPS, "weights", maps.reshape(*shape[:-1], maps.shape[-1]))
        else:
            out = attention(q, k, v, mask, self.implementation)
        out = nn.DenseGeneral(
            self.out_features or shape[-1],
            axis=(-2, -1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="out",
        )(out)
        return out.reshape(*shape[:-1], out.shape[-1])


class MLP(nn.Module):
    """Dense -> GELU -> dropout -> Dense, back to the input width unless `out_features`."""

    hidden_features: int
    out_features: int | None = None
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dense = lambda n, name: nn.Dense(  # noqa: E731
            n, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        h = nn.gelu(dense(self.hidden_features, "fc1")(x))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return dense(self.out_features or x.shape[-1], "fc2")(h)


class TransformerBlock(nn.Module):
    """Pre-LN block: self-attention, then cross-attention if `context` is given, then MLP.

    `mask` masks the block's own keys `[B, N]`; `context_mask` masks the context's `[B, M]`.
    Cross-attention parameters exist only if the block was initialised with a context.
    `rotary`: the self-attention uses rotary positions.
    """

    num_heads: int
    head_dim: int | None = None
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    implementation: str | None = None
    rotary: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        mask: jax.Array | None = None,
        context_mask: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = lambda name: Attention(  # noqa: E731
            self.num_heads, self.head_dim, implementation=self.implementation, name=name, **kw
        )
        drop = nn.Dropout(self.dropout, deterministic=not train)
        self_attn = Attention(self.num_heads, self.head_dim, implementation=self.implementation,
                              rotary=self.rotary, name="self_attn", **kw)
        x = x + drop(self_attn(LayerNorm32(name="norm1", **kw)(x), mask=mask))
        if context is not None:
            h = LayerNorm32(name="norm_cross", **kw)(x)
            x = x + drop(attn("cross_attn")(h, context, mask=context_mask))
        h = LayerNorm32(name="norm2", **kw)(x)
        h = MLP(int(self.mlp_ratio * x.shape[-1]), dropout=self.dropout, name="mlp", **kw)(h, train)
        return x + drop(h)


class SinusoidalEmbedding(nn.Module):
    """Fixed sin/cos features of one scalar per example (e.g. a timestep): `[B] -> [B, dim]`.

    Computed and returned in float32: timesteps up to ~1000 times frequencies lose all phase
    precision in bfloat16.
    """

    dim: int
    max_period: float = 10_000.0
    dtype: Dtype = jnp.float32  # unused: kept for the uniform module interface
    param_dtype: Dtype = jnp.float32

    def __call__(self, t: jax.Array) -> jax.Array:
        half = self.dim // 2
        freqs = jnp.exp(-math.log(self.max_period) * jnp.arange(half, dtype=jnp.float32) / half)
        angles = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
        emb = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
        if self.dim % 2:
            emb = jnp.pad(emb, ((0, 0), (0, 1)))
        return emb
