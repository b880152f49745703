"""A small bidirectional Transformer that turns captions into conditioning for image models."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.layers import Dtype, LayerNorm32, TransformerBlock

PAD_ID = 0
POSITIONS = ("learned", "rotary", "none")


class TextEncoder(nn.Module):
    """Tokens `[B, L]` int32 (PAD = 0) -> `(context [B, L, width], aux)`.

    aux: `pooled` `[B, width]` (masked mean of the non-pad tokens, then a Dense) and `mask`
    `[B, L]` bool (True = real token), which cross-attention layers pass on as `context_mask`.
    Padded keys are masked in every attention, so padding appended to a caption changes
    neither the pooled vector nor the context at its real tokens. `context` and `pooled` are
    float32 (they come out of a norm / a mean); consumers cast them to their compute dtype.

    `positions`: "learned" adds a learned vector per absolute slot (what every model saved
    before this choice existed uses), "rotary" rotates the self-attention's queries and keys
    by position (relative positions, no parameters), "none" gives no position information.
    """

    vocab_size: int = 259
    width: int = 128
    depth: int = 2
    num_heads: int = 4
    max_len: int = 64
    positions: str = "learned"
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False):
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(f"caption length {length} exceeds max_len {self.max_len}")
        if self.positions not in POSITIONS:
            raise ValueError(f"text positions must be one of {POSITIONS}, got {self.positions!r}")
        mask = tokens != PAD_ID
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Embed(
            self.vocab_size,
            self.width,
            embedding_init=nn.initializers.normal(0.02),
            name="token_embed",
            **kw,
        )(tokens)
        if self.positions == "learned":
            pos = self.param(
                "pos_embed", nn.initializers.normal(0.02), (self.max_len, self.width), self.param_dtype
            )
            x = x + pos[None, :length].astype(self.dtype)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        for i in range(self.depth):
            x = TransformerBlock(
                self.num_heads,
                mlp_ratio=self.mlp_ratio,
                dropout=self.dropout,
                implementation=self.implementation,
                rotary=self.positions == "rotary",
                name=f"block{i}",
                **kw,
            )(x, mask=mask, train=train)
        context = LayerNorm32(name="final_norm", dtype=jnp.float32, param_dtype=self.param_dtype)(x)

        weights = mask.astype(jnp.float32)[..., None]
        # max(count, 1): an all-padding caption pools to zeros instead of 0/0.
        mean = jnp.sum(context * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        pooled = nn.Dense(self.width, name="pool_proj", **kw)(mean).astype(jnp.float32)
        return context, {"pooled": pooled, "mask": mask}


TextEncoderTiny = functools.partial(TextEncoder, width=32, depth=1, num_heads=2)


def configure_text(module: nn.Module, *, vocab_size: int, positions: str) -> nn.Module:
    """`module` (a model with a `text` TextEncoder constructor, or None) with its text
    encoder's vocabulary size and position scheme set; a model without text is returned as is."""
    if getattr(module, "text", None) is None:
        return module
    return module.clone(text=functools.partial(module.text, vocab_size=vocab_size, positions=positions))
