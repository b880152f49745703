
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.layers import (
    MLP,
    Attention,
    Downsample,
    GroupNorm32,
    ResBlock,
    SinusoidalEmbedding,
    TransformerBlock,
    Upsample,
)
from tests.models.jit_helpers import KEY, apply, init, key

def _param_dtypes(variables):
    return {leaf.dtype for leaf in jax.tree.leaves(variables)}


def test_group_norm_computes_in_float32():
    # A large offset with small spread: a bfloat16 variance would be pure rounding noise.
    x = 100.0 + jax.random.normal(KEY, (2, 4, 4, 16))
    x_bf16 = x.astype(jnp.bfloat16)
    norm = GroupNorm32(groups=4, dtype=jnp.bfloat16)
    variables = init(norm, x_bf16)
    out = apply(norm, variables, x_bf16)
    assert out.dtype == jnp.bfloat16
    assert _param_dtypes(variables) == {jnp.dtype(jnp.float32)}
    ref = apply(GroupNorm32(groups=4), variables, x_bf16.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=0.05)
    assert float(jnp.std(ref)) == pytest.approx(1.0, abs=0.05)


def test_group_norm_falls_back_to_a_divisor_of_channels():
    x = jnp.ones((1, 2, 2, 12))
    variables = init(GroupNorm32(groups=8), x)  # gcd(8, 12) = 4 groups
    assert apply(GroupNorm32(groups=8), variables, x).shape == x.shape


@pytest.mark.parametrize("cond_dim", [None, 7])
def test_resblock_shapes_and_film(cond_dim):
    x = jax.random.normal(KEY, (2, 8, 8, 4))
    cond = None if cond_dim is None else jax.random.normal(KEY, (2, cond_dim))
    block = ResBlock(8, groups=4)
    variables = init(block, x, cond)
    out = apply(block, variables, x, cond)
    assert out.shape == (2, 8, 8, 8) and out.dtype == jnp.float32
    assert ("film" in variables["params"]) == (cond_dim is not None)
    if cond_dim is not None:
        # Zero-initialised FiLM: the conditioned block starts as the unconditioned one.
        out_other = apply(block, variables, x, cond + 5.0)
        np.testing.assert_allclose(out, out_other, atol=1e-6)


def test_resblock_bfloat16_compute_keeps_float32_params():
    x = jax.random.normal(KEY, (2, 8, 8, 8))
    block = ResBlock(8, groups=4, dtype=jnp.bfloat16, dropout=0.1)
    variables = init(block, x, jnp.ones((2, 3)))
    assert _param_dtypes(variables) == {jnp.dtype(jnp.float32)}
    out = apply(block, variables, x, jnp.ones((2, 3)), train=True, rngs={"dropout": KEY})
    assert out.dtype == jnp.bfloat16


def test_down_and_upsample():
    x = jnp.ones((2, 8, 8, 4))
    down = Downsample(6)
    y = apply(down, init(down, x), x)
    assert y.shape == (2, 4, 4, 6)
    up = Upsample(3)
    assert apply(up, init(up, y), y).shape == (2, 8, 8, 3)


def test_attention_self_and_cross_shapes():
    x = jax.random.normal(KEY, (2, 5, 16))
    context = jax.random.normal(KEY, (2, 7, 24))
    attn = Attention(num_heads=4)
    self_vars = init(attn, x)
    assert apply(attn, self_vars, x).shape == (2, 5, 16)
    cross_vars = init(attn, x, context)
    assert cross_vars["params"]["key"]["kernel"].shape == (24, 4, 4)
    assert apply(attn, cross_vars, x, context).shape == (2, 5, 16)
    # Feature maps are flattened to a sequence and restored.
    fmap = jax.random.normal(KEY, (2, 3, 3, 16))
    assert apply(attn, cross_vars, fmap, context).shape == (2, 3, 3, 16)


def test_attention_masked_keys_have_no_effect():
    x = jax.random.normal(KEY, (2, 5, 16))
    context = jax.random.normal(key(1), (2, 7, 16))
    mask = jnp.arange(7)[None, :] < jnp.array([[4], [7]])
    attn = Attention(num_heads=2, head_dim=8)
    variables = init(attn, x, context, mask)
    out = apply(attn, variables, x, context, mask)
    changed = context.at[0, 5].set(100.0)
    np.testing.assert_allclose(apply(attn, variables, x, changed, mask), out, atol=1e-6)
    # The unmasked row does see the change.
    changed = context.at[1, 5].set(100.0)
    assert not np.allclose(apply(attn, variables, x, changed, mask)[1], out[1], atol=1e-3)


def test_attention_fully_masked_row_is_finite():
    x = jax.random.normal(KEY, (2, 5, 16))
    mask = jnp.zeros((2, 5), bool)
    attn = Attention(num_heads=2)
    variables = init(attn, x)
    assert np.isfinite(apply(attn, variables, x, mask=mask)).all()


def test_attention_bfloat16():
    x = jax.random.normal(KEY, (2, 5, 16))
    attn = Attention(num_heads=2, dtype=jnp.bfloat16)
    variables = init(attn, x)
    assert _param_dtypes(variables) == {jnp.dtype(jnp.float32)}
    assert apply(attn, variables, x).dtype == jnp.bfloat16


def test_mlp_shapes():
    mlp = MLP(32, dropout=0.5)
    x = jnp.ones((2, 3, 8))
    variables = init(mlp, x)
    assert apply(mlp, variables, x, train=True, rngs={"dropout": KEY}).shape == (2, 3, 8)


def test_transformer_block_self_and_cross():
    x = jax.random.normal(KEY, (2, 5, 16))
    context = jax.random.normal(KEY, (2, 7, 12))
    context_mask = jnp.arange(7)[None, :] < 3
    block = TransformerBlock(num_heads=2)
    variables = init(block, x)
    assert "cross_attn" not in variables["params"]
    assert apply(block, variables, x).shape == x.shape
    variables = init(block, x, context, context_mask=context_mask)
    assert "cross_attn" in variables["params"]
    out = apply(block, variables, x, context, context_mask=context_mask)
    assert out.shape == x.shape
    changed = context.at[:, 4:].set(9.0)
    np.testing.assert_allclose(
        apply(block, variables, x, changed, context_mask=context_mask), out, atol=1e-5
    )


def test_sinusoidal_embedding():
    emb = apply(SinusoidalEmbedding(9), {}, jnp.array([0, 10, 999]))
    assert emb.shape == (3, 9) and emb.dtype == jnp.float32
    np.testing.assert_allclose(emb[0, :4], 1.0)  # cos(0)
    assert not np.allclose(emb[1], emb[2])
