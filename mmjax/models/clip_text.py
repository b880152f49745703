"""The CLIP text transformer that Stable Diffusion reads prompts with (`CLIPTextModel`).

Token and learned position embeddings, `depth` pre-LN blocks of causal self-attention and an MLP
(`quick_gelu` for SD 1.x's OpenAI CLIP, `gelu` for SD 2.x's OpenCLIP), and a final LayerNorm.
`__call__(tokens)` returns `(context [B, L, width] float32, aux)` like the zoo's own TextEncoder:

- `context`: the final layer's hidden states after the final norm, or, with
  `output="penultimate"`, the states of the layer before it passed through the final norm (what
  SD 2.x pipelines and "clip skip 1" use);
- `aux["pooled"]`: the final normed state at each row's end token (the first `eos_id`, or the
  largest id where `eos_id` is None, as CLIP's original configs do); `aux["mask"]`: all True,
  because SD's UNet attends to every position, padding included.

Parameter names follow the project's layers; `mmjax/interop` maps a checkpoint's tensors onto them.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.layers import Attention, Dtype, LayerNorm32

ACTIVATIONS = ("quick_gelu", "gelu")
OUTPUTS = ("last", "penultimate")


def _activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    raise ValueError(f"CLIP text activation must be one of {ACTIVATIONS}, got {name!r}")


class CLIPTextBlock(nn.Module):
    num_heads: int
    mlp_dim: int
    act: str = "quick_gelu"
    eps: float = 1e-5
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm32(self.eps, name="norm1", **kw)(x)
        x = x + Attention(self.num_heads, implementation=self.implementation, name="self_attn", **kw)(h, mask=mask)
        h = LayerNorm32(self.eps, name="norm2", **kw)(x)
        h = nn.Dense(self.mlp_dim, name="fc1", **kw)(h)
        h = nn.Dense(x.shape[-1], name="fc2", **kw)(_activation(self.act)(h))
        return x + h


class CLIPTextTransformer(nn.Module):
    vocab_size: int = 49408
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    max_len: int = 77
    act: str = "quick_gelu"
    eps: float = 1e-5
    eos_id: int | None = 49407
    output: str = "last"
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False):
        del train  # no dropout in CLIP's text tower
        if self.output not in OUTPUTS:
            raise ValueError(f"CLIP text output must be one of {OUTPUTS}, got {self.output!r}")
        batch, length = tokens.shape
        if length > self.max_len:
            raise ValueError(f"prompt length {length} exceeds the text encoder's {self.max_len} positions")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Embed(self.vocab_size, self.width, name="token_embed", **kw)(tokens)
        pos = self.param("pos_embed", nn.initializers.normal(0.01), (self.max_len, self.width), self.param_dtype)
        x = x + pos[None, :length].astype(self.dtype)
        causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
        hidden = [x]  # the embeddings, then each block's output
        for i in range(self.depth):
            hidden.append(CLIPTextBlock(self.num_heads, self.mlp_dim, self.act, self.eps, self.implementation,
                                        name=f"layers_{i}", **kw)(hidden[-1], causal))
        final_norm = LayerNorm32(self.eps, name="final_norm", dtype=jnp.float32, param_dtype=self.param_dtype)
        last = final_norm(hidden[-1])
        context = last if self.output == "last" else final_norm(hidden[-2])
        if self.eos_id is None:
            ends = jnp.argmax(tokens, axis=-1)
        else:
            ends = jnp.argmax(tokens == self.eos_id, axis=-1)
        pooled = last[jnp.arange(batch), ends]
        return context.astype(jnp.float32), {"pooled": pooled.astype(jnp.float32),
                                             "mask": jnp.ones((batch, length), bool)}
