"""A text-conditioned GAN: residual generator and projection discriminator, SAGAN-style.

Generator `(z, text) -> images`: a Dense stem to 4x4, residual up-blocks that each double the
resolution, self-attention at `attn_resolution`, and a tanh RGB head. Every block's
normalisation is conditional: GroupNorm without its own affine, then a per-channel scale and
shift computed from `[z_i, text]`, where `text` is a projection of the TextEncoder's pooled
caption vector (BigGAN's conditional BatchNorm, but batch-independent, so one image's output
never depends on the others in its batch: inversion under `vmap` relies on it). `z` is one
`[B, z_dim]` vector fed to every block, or `[B, num_layers, z_dim]` with one vector per block
("z+", which inversion uses to reconstruct images the plain z space cannot reach).

Discriminator `(images, tokens) -> logits [B]`: residual down-blocks, self-attention, and a
projection head (Miyato & Koyama 2018): `linear(f) + <f, embed(text)>`, where `f` is the
pooled image feature, so the score measures image-text agreement as well as realism. Every
convolution, attention projection and head of the discriminator is spectrally normalised (its
text encoder, whose output enters only through the normalised `embed`, is not): the largest
singular value of each kernel, reshaped to `[fan_in, out]`, is estimated by power iteration
with a persistent vector kept in the `spectral` collection, and the kernel divided by it.
"""
from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.layers import Dtype, attention
from mmjax.models.text import TextEncoder, TextEncoderTiny

SPECTRAL = "spectral"
INIT_POWER_ITERATIONS = 15


def _normalize(x, eps: float = 1e-12):
    return x / jnp.sqrt(jnp.sum(jnp.square(x)) + eps)


def spectral_normalize(kernel: jax.Array, u: jax.Array, iterations: int):
    """`(kernel / sigma, new u, sigma)`: sigma estimated by `iterations` power-iteration steps
    from `u` on the kernel as a `[fan_in, out]` matrix. The vectors are constants to the
    gradient (as in Miyato et al.); sigma is not, so the gradient sees the normalisation."""
    w = kernel.reshape(-1, kernel.shape[-1]).astype(jnp.float32)
    u = jax.lax.stop_gradient(u)
    w_const = jax.lax.stop_gradient(w)

    def step(_, carry):
        u, _ = carry
        u = _normalize(w_const.T @ _normalize(w_const @ u))
        return u, _normalize(w_const @ u)

    # A loop, not unrolled Python: init's many iterations would grow every kernel's program.
    u, v = jax.lax.fori_loop(0, max(iterations, 1), step, (u, jnp.zeros((w.shape[0],), jnp.float32)))
    sigma = v @ (w @ u)
    return (kernel.astype(jnp.float32) / sigma).astype(kernel.dtype), u, sigma


class _SpectralKernel(nn.Module):
    """A kernel parameter and its power-iteration vector; returns the normalised kernel."""

    shape: tuple[int, ...]
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, update: bool) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), self.shape, self.param_dtype)
        initializing = self.is_initializing()
        u_var = self.variable(
            SPECTRAL, "u",
            lambda: _normalize(jax.random.normal(self.make_rng("params"), (self.shape[-1],), jnp.float32)))
        # At init, converge the estimate so a fresh network starts normalised; afterwards one
        # step per training update tracks the slowly moving kernel.
        iterations = INIT_POWER_ITERATIONS if initializing else 1
        normalized, u, _ = spectral_normalize(kernel, u_var.value, iterations)
        if update or initializing:
            u_var.value = u
        return normalized


class SNDense(nn.Module):
    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, update: bool = False) -> jax.Array:
        kernel = _SpectralKernel((x.shape[-1], self.features), self.param_dtype, name="sn")(update)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
        return y


class SNConv(nn.Module):
    features: int
    kernel_size: int = 3
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, update: bool = False) -> jax.Array:
        k = self.kernel_size
        kernel = _SpectralKernel((k, k, x.shape[-1], self.features), self.param_dtype, name="sn")(update)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel.astype(self.dtype), (1, 1), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
        return y


def _avg_pool2(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _upsample2(x):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class SelfAttention(nn.Module):
    """SAGAN self-attention over the H*W positions: `x + gamma * attn(x)`, gamma starting at 0
    so the block begins as the identity. `spectral` normalises its projections (discriminator)."""

    num_heads: int = 1
    reduction: int = 2  # query/key/value width: channels // reduction
    spectral: bool = False
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, update: bool = False) -> jax.Array:
        b, h, w, c = x.shape
        inner = max(c // self.reduction, self.num_heads) // self.num_heads * self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.spectral:
            proj = lambda n, name: functools.partial(SNDense(n, use_bias=False, name=name, **kw), update=update)  # noqa: E731
        else:
            proj = lambda n, name: nn.Dense(n, use_bias=False, name=name, **kw)  # noqa: E731
        seq = x.reshape(b, h * w, c)
        heads = lambda t, d: t.reshape(b, h * w, self.num_heads, d // self.num_heads)  # noqa: E731
        q = heads(proj(inner, "query")(seq), inner)
        k = heads(proj(inner, "key")(seq), inner)
        v = heads(proj(inner, "value")(seq), inner)
        out = attention(q, k, v, implementation=self.implementation).reshape(b, h * w, inner)
        out = proj(c, "out")(out).reshape(b, h, w, c)
        gamma = self.param("gamma", nn.initializers.zeros, (), self.param_dtype)
        return x + gamma.astype(self.dtype) * out.astype(self.dtype)


class ConditionalNorm(nn.Module):
    """GroupNorm (statistics in float32, no affine of its own), then `h * (1 + scale) + shift`
    with scale and shift a Dense of the conditioning vector (zero-initialised)."""

    groups: int = 8
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        c = x.shape[-1]
        groups = _gcd(self.groups, c)
        h = nn.GroupNorm(num_groups=groups, use_scale=False, use_bias=False, epsilon=1e-5,
                         dtype=jnp.float32, param_dtype=self.param_dtype)(x.astype(jnp.float32))
        film = nn.Dense(2 * c, kernel_init=nn.initializers.zeros, dtype=jnp.float32,
                        param_dtype=self.param_dtype, name="film")(cond.astype(jnp.float32))
        scale, shift = jnp.split(film[:, None, None, :], 2, axis=-1)
        return (h * (1.0 + scale) + shift).astype(self.dtype)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


class GBlock(nn.Module):
    """Residual up-block: CN, ReLU, upsample, conv3x3, CN, ReLU, conv3x3; skip upsample + 1x1."""

    features: int
    groups: int = 8
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.relu(ConditionalNorm(self.groups, name="norm1", **kw)(x, cond))
        h = nn.Conv(self.features, (3, 3), name="conv1", **kw)(_upsample2(h))
        h = nn.relu(ConditionalNorm(self.groups, name="norm2", **kw)(h, cond))
        h = nn.Conv(self.features, (3, 3), name="conv2", **kw)(h)
        skip = nn.Conv(self.features, (1, 1), name="skip", **kw)(_upsample2(x.astype(self.dtype)))
        return skip + h


class DBlock(nn.Module):
    """Residual down-block with spectral norm: (ReLU), conv3x3, ReLU, conv3x3, avg-pool;
    skip 1x1 conv + avg-pool. The first block skips the leading ReLU (it sees raw pixels)."""

    features: int
    first: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, update: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = x if self.first else nn.relu(x)
        h = SNConv(self.features, 3, name="conv1", **kw)(h, update)
        h = SNConv(self.features, 3, name="conv2", **kw)(nn.relu(h), update)
        h = _avg_pool2(h)
        # Pooling and a 1x1 conv commute: pool first where the input is the narrower side.
        if x.shape[-1] <= self.features:
            skip = SNConv(self.features, 1, name="skip", **kw)(_avg_pool2(x), update)
        else:
            skip = _avg_pool2(SNConv(self.features, 1, name="skip", **kw)(x, update))
        return skip + h


class Generator(nn.Module):
    """`(z, tokens) -> images [B, S, S, 3]` float32 in [-1, 1], S = 4 * 2**len(widths).

    Also: `encode_text(tokens) -> text [B, text_dim]` and `synthesize(z, text)`, so a caller
    can blend captions (interpolation) or optimise the text vector (inversion without one).
    Like z, `text` may differ per layer (`[B, num_layers, text_dim]`): an edit can keep the
    source caption in the early, coarse layers (where shape and place are decided) and give
    the target caption to the later ones.
    """

    widths: tuple[int, ...] = (128, 64, 32)
    z_dim: int = 64
    text_dim: int = 64
    attn_resolution: int = 16
    groups: int = 8
    text: Callable[..., TextEncoder] = TextEncoder
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def num_layers(self) -> int:
        """How many places `z` enters: the stem and each up-block (the length of a z+ code)."""
        return 1 + len(self.widths)

    @property
    def image_size(self) -> int:
        return 4 * 2 ** len(self.widths)

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.text_encoder = self.text(**kw)
        self.text_proj = nn.Dense(self.text_dim, param_dtype=self.param_dtype)
        self.stem = nn.Dense(4 * 4 * self.widths[0], **kw)
        self.blocks = [GBlock(w, self.groups, **kw) for w in self.widths]
        self.attn = SelfAttention(implementation=self.implementation, **kw)
        self.out_norm = nn.GroupNorm(num_groups=_gcd(self.groups, self.widths[-1]), dtype=jnp.float32,
                                     param_dtype=self.param_dtype)
        self.out_conv = nn.Conv(3, (3, 3), dtype=jnp.float32, param_dtype=self.param_dtype)

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        _, aux = self.text_encoder(tokens)
        return self.text_proj(aux["pooled"]).astype(jnp.float32)

    def synthesize(self, z: jax.Array, text: jax.Array) -> jax.Array:
        if z.ndim == 2:
            z = jnp.broadcast_to(z[:, None], (z.shape[0], self.num_layers, z.shape[-1]))
        if z.shape[1:] != (self.num_layers, self.z_dim):
            raise ValueError(f"z must be [B, {self.z_dim}] or [B, {self.num_layers}, {self.z_dim}], got {z.shape}")
        if text.ndim == 2:
            text = jnp.broadcast_to(text[:, None], (text.shape[0], self.num_layers, text.shape[-1]))
        if text.shape[1] != self.num_layers:
            raise ValueError(f"text must be [B, {self.text_dim}] or [B, {self.num_layers}, {self.text_dim}], "
                             f"got {text.shape}")
        conds = [jnp.concatenate([z[:, i].astype(jnp.float32), text[:, i].astype(jnp.float32)], axis=-1)
                 for i in range(self.num_layers)]
        h = self.stem(conds[0]).reshape(z.shape[0], 4, 4, self.widths[0])
        resolution = 4
        for i, block in enumerate(self.blocks):
            h = block(h, conds[i + 1])
            resolution *= 2
            if resolution == self.attn_resolution:
                h = self.attn(h)
        h = nn.relu(self.out_norm(h.astype(jnp.float32)))
        return jnp.tanh(self.out_conv(h))

    def __call__(self, z: jax.Array, tokens: jax.Array) -> jax.Array:
        return self.synthesize(z, self.encode_text(tokens))


class Discriminator(nn.Module):
    """`(images, tokens, update=False) -> logits [B]` float32; `update` advances the power
    iterations (apply with `mutable=['spectral']`)."""

    widths: tuple[int, ...] = (32, 64, 128)
    attn_resolution: int = 16
    text: Callable[..., TextEncoder] = TextEncoder
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, tokens: jax.Array, update: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = images.astype(self.dtype)
        resolution = images.shape[1]
        for i, width in enumerate(self.widths):
            h = DBlock(width, first=i == 0, name=f"block{i}", **kw)(h, update)
            resolution //= 2
            if resolution == self.attn_resolution:
                h = SelfAttention(spectral=True, implementation=self.implementation, name="attn", **kw)(h, update)
        feature = jnp.sum(nn.relu(h).astype(jnp.float32), axis=(1, 2))
        _, aux = self.text(name="text_encoder", **kw)(tokens)
        embed = SNDense(feature.shape[-1], use_bias=False, dtype=jnp.float32, param_dtype=self.param_dtype,
                        name="text_embed")(aux["pooled"].astype(jnp.float32), update)
        linear = SNDense(1, dtype=jnp.float32, param_dtype=self.param_dtype, name="linear")(feature, update)
        return linear[:, 0] + jnp.sum(feature * embed, axis=-1)


class GAN(nn.Module):
    """Holds both networks (params `generator` and `discriminator`); the family applies each
    through its own method so the two objectives can update them separately."""

    g_widths: tuple[int, ...] = (128, 64, 32)
    d_widths: tuple[int, ...] = (32, 64, 128)
    z_dim: int = 64
    text_dim: int = 64
    attn_resolution: int = 16
    groups: int = 8
    text: Callable[..., TextEncoder] = TextEncoder
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, implementation=self.implementation,
                  attn_resolution=self.attn_resolution, text=self.text)
        self.generator = Generator(self.g_widths, self.z_dim, self.text_dim, groups=self.groups, **kw)
        self.discriminator = Discriminator(self.d_widths, **kw)

    @property
    def image_size(self) -> int:
        return 4 * 2 ** len(self.g_widths)

    @property
    def num_layers(self) -> int:
        return 1 + len(self.g_widths)

    def __call__(self, z, tokens, images):
        """Initialises both networks (what `init` calls)."""
        fake = self.generator(z, tokens)
        return fake, self.discriminator(images, tokens)

    def generate(self, z, tokens):
        return self.generator(z, tokens)

    def encode_text(self, tokens):
        return self.generator.encode_text(tokens)

    def synthesize(self, z, text):
        return self.generator.synthesize(z, text)

    def discriminate(self, images, tokens, update: bool = False):
        return self.discriminator(images, tokens, update)


GANTiny = functools.partial(GAN, g_widths=(32, 16), d_widths=(16, 32), z_dim=16, text_dim=16,
                            attn_resolution=8, groups=4, text=TextEncoderTiny)
GANSmall = functools.partial(GAN, g_widths=(128, 64, 32), d_widths=(32, 64, 128), z_dim=64, text_dim=64,
                             attn_resolution=16, groups=8,
                             text=functools.partial(TextEncoder, width=64, depth=2, num_heads=4))
GAN64 = functools.partial(GAN, g_widths=(512, 256, 128, 64), d_widths=(64, 128, 256, 512), z_dim=128,
                          text_dim=128, attn_resolution=32, groups=32,
                          text=functools.partial(TextEncoder, width=256, depth=4, num_heads=8))
