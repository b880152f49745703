"""Differentiable augmentation for GAN discriminators (DiffAugment, with ADA's probability).

Each transform is applied to each image independently with probability `p`; all of them are
differentiable in the pixels, so the generator's gradient passes through the same
augmentation the discriminator saw on real images. Nothing here flips images: the `shapes`
captions name left and right.

- translation: shift by up to `translation` x image side in each axis, zero-filled;
- cutout: zero a square of half the image side at a random place;
- color: brightness (+-0.5 on the [-1, 1] scale, i.e. +-0.25 of the range), saturation
  (x0..2 around the pixel's mean) and contrast (x0.5..1.5 around the image mean).
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

KINDS = ("translation", "cutout", "color")


def _apply(mask, new, old):
    return jnp.where(mask[:, None, None, None], new, old)


def _translate(images, key, fraction: float):
    b, h, w, c = images.shape
    pad = max(1, int(round(fraction * h)))
    shifts = jax.random.randint(key, (b, 2), -pad, pad + 1)
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def crop(image, shift):
        return jax.lax.dynamic_slice(image, (pad - shift[0], pad - shift[1], 0), (h, w, c))

    return jax.vmap(crop)(padded, shifts)


def _cutout(images, key):
    b, h, w, _ = images.shape
    ch, cw = h // 2, w // 2
    ky, kx = jax.random.split(key)
    top = jax.random.randint(ky, (b, 1, 1), -(ch // 2), h - ch // 2)
    left = jax.random.randint(kx, (b, 1, 1), -(cw // 2), w - cw // 2)
    rows = jnp.arange(h)[None, :, None]
    cols = jnp.arange(w)[None, None, :]
    inside = (rows >= top) & (rows < top + ch) & (cols >= left) & (cols < left + cw)
    # Zero on the [0, 1] scale is -1 here: cut to black, like the shapes background.
    return jnp.where(inside[..., None], -1.0, images)


def _color(images, key):
    b = images.shape[0]
    kb, ks, kc = jax.random.split(key, 3)
    x = images + jax.random.uniform(kb, (b, 1, 1, 1), minval=-0.5, maxval=0.5)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    x = (x - mean) * jax.random.uniform(ks, (b, 1, 1, 1), minval=0.0, maxval=2.0) + mean
    mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    return (x - mean) * jax.random.uniform(kc, (b, 1, 1, 1), minval=0.5, maxval=1.5) + mean


def augment(images: jax.Array, key: jax.Array, p: jax.Array, kinds: Sequence[str] = KINDS,
            translation: float = 0.125) -> jax.Array:
    """Applies each transform in `kinds` to each image with probability `p` (a traced scalar)."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown augmentation(s) {sorted(unknown)}; known: {list(KINDS)}")
    x = images.astype(jnp.float32)
    b = x.shape[0]
    for kind in KINDS:
        if kind not in kinds:
            continue
        key, k_mask, k_op = jax.random.split(key, 3)
        mask = jax.random.uniform(k_mask, (b,)) < p
        if kind == "translation":
            new = _translate(x, k_op, translation)
        elif kind == "cutout":
            new = _cutout(x, k_op)
        else:
            new = _color(x, k_op)
        x = _apply(mask, new, x)
    return x.astype(images.dtype)
