"""CLIP guidance: steer a differentiable generator toward a prompt by the gradient of CLIP
similarity, staying near where it started.

    z* = argmax_z  cos(embed(decode(z)), target) - anchor * mean((z - z0)^2)

by `steps` Adam steps from z0 (e.g. an image's VAE posterior mean), each example on its own.
One `lax.scan`: the whole edit is one compiled program.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax


def clip_guided_latents(decode: Callable[[jax.Array], jax.Array], embed_images: Callable[[jax.Array], jax.Array],
                        z0: jax.Array, target_emb: jax.Array, *, steps: int, lr: float = 0.05,
                        anchor: float = 0.1) -> tuple[jax.Array, jax.Array]:
    """-> (z after `steps` steps, cosine similarity to the target before each step `[steps, N]`).

    decode: latents `[N, ...]` -> images `[N, H, W, C]` in [-1, 1]; embed_images: images -> unit
    vectors `[N, D]`; target_emb: unit vectors `[N, D]`.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    reduce_axes = tuple(range(1, z0.ndim))
    optimizer = optax.adam(lr)

    def objective(z):
        similarity = jnp.sum(embed_images(decode(z)) * target_emb, axis=-1)
        drift = jnp.mean(jnp.square(z - z0), axis=reduce_axes)
        # Summed over examples: each latent's gradient is its own example's.
        return jnp.sum(anchor * drift - similarity), similarity

    def body(carry, _):
        z, state = carry
        (_, similarity), grad = jax.value_and_grad(objective, has_aux=True)(z)
        updates, state = optimizer.update(grad, state, z)
        return (optax.apply_updates(z, updates), state), similarity

    (z, _), history = jax.lax.scan(body, (z0, optimizer.init(z0)), None, length=steps)
    return z, history
