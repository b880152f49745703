"""A CLIP/SigLIP two-tower model: an image tower and the shared text encoder, each projected
into one embedding space where matching image-caption pairs have high cosine similarity.

The image tower is the ResNet backbone of the CNN family (CoordConv, mean + max + moment
pooling: position and size survive pooling) or a small ViT. The text tower is the
`TextEncoder` every family uses; its pooled output is projected. The temperature (as a log
scale) and, for SigLIP, a bias are learned scalars.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.cnn import ResNetClassifier
from mmjax.models.layers import Dtype, LayerNorm32, TransformerBlock
from mmjax.models.text import TextEncoder, TextEncoderTiny


class ViT(nn.Module):
    """Images `[B, H, W, 3]` -> pooled features `[B, width]`: patchify, pre-LN Transformer,
    mean over patches (no class token: nothing to gain at these sizes)."""

    patch: int = 4
    width: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        b, h, w, _ = images.shape
        if h % self.patch or w % self.patch:
            raise ValueError(f"image {h}x{w} is not divisible into {self.patch}x{self.patch} patches")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Conv(self.width, (self.patch, self.patch), strides=(self.patch, self.patch), padding="VALID",
                    name="patchify", **kw)(images.astype(self.dtype))
        x = x.reshape(b, -1, self.width)
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (x.shape[1], self.width), self.param_dtype)
        x = x + pos[None].astype(self.dtype)
        for i in range(self.depth):
            x = TransformerBlock(self.num_heads, mlp_ratio=self.mlp_ratio, implementation=self.implementation,
                                 name=f"block{i}", **kw)(x, train=train)
        return LayerNorm32(name="final_norm", dtype=jnp.float32, param_dtype=self.param_dtype)(x).mean(axis=1)


class CLIP(nn.Module):
    """`(images, tokens)` -> unit-norm embeddings `[B, embed_dim]` of each, float32.

    `image_tower` builds the image encoder: a ResNet backbone (its heads unused) or a ViT.
    `logit_scale` starts at log(1 / 0.07) as in CLIP; `logit_bias` at -10 as in SigLIP (it
    is unused by the softmax loss).
    """

    embed_dim: int = 128
    image_tower: Callable[..., nn.Module] = functools.partial(
        ResNetClassifier, widths=(32, 64, 128), groups=8, num_classes=(), head_names=())
    text: Callable[..., TextEncoder] = TextEncoder
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.image_encoder = self.image_tower(**kw)
        self.text_encoder = self.text(implementation=self.implementation, **kw)
        self.image_proj = nn.Dense(self.embed_dim, use_bias=False, **kw)
        self.text_proj = nn.Dense(self.embed_dim, use_bias=False, **kw)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(math.log(1 / 0.07)), ())
        self.logit_bias = self.param("logit_bias", nn.initializers.constant(-10.0), ())

    def embed_images(self, images: jax.Array, train: bool = False) -> jax.Array:
        out = self.image_encoder(images, train=train)
        features = out[1]["features"] if isinstance(out, tuple) else out  # ResNet: (logits, aux)
        return _normalize(self.image_proj(features.astype(self.dtype)))

    def embed_texts(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        _, aux = self.text_encoder(tokens, train=train)
        return _normalize(self.text_proj(aux["pooled"].astype(self.dtype)))

    def __call__(self, images: jax.Array, tokens: jax.Array, train: bool = False):
        """-> (image embeddings, text embeddings, logit scale, logit bias); the scale is exp'd."""
        return (self.embed_images(images, train), self.embed_texts(tokens, train),
                jnp.exp(self.logit_scale), self.logit_bias)


def _normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


_resnet = functools.partial(ResNetClassifier, num_classes=(), head_names=())

CLIPTiny = functools.partial(
    CLIP, embed_dim=32, image_tower=functools.partial(_resnet, widths=(16, 32), groups=4), text=TextEncoderTiny)
CLIPTinyViT = functools.partial(
    CLIP, embed_dim=32, image_tower=functools.partial(ViT, patch=4, width=32, depth=1, num_heads=2),
    text=TextEncoderTiny)
# The shapes model: the judge's backbone with max pooling (small shapes), a 2-layer text encoder.
CLIPSmall = functools.partial(
    CLIP, embed_dim=128, image_tower=functools.partial(_resnet, widths=(32, 64, 128), groups=8), text=TextEncoder)
CLIPSmallViT = functools.partial(
    CLIP, embed_dim=128, image_tower=functools.partial(ViT, patch=4, width=128, depth=4, num_heads=4),
    text=TextEncoder)
# The accelerator config at 64x64: the CNN64 backbone and a 4-layer, 256-wide text encoder.
CLIP64 = functools.partial(
    CLIP, embed_dim=256, image_tower=functools.partial(_resnet, widths=(64, 128, 256, 512), blocks_per_stage=2,
                                                       groups=32),
    text=functools.partial(TextEncoder, width=256, depth=4, num_heads=8))
