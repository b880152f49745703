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

KEY = jax.random.PRNGKey(0)


def _param_dtypes(variables):
    return {leaf.dtype for leaf in jax.tree.leaves(variables)}


def test_group_norm_computes_in_float32():
    # A large offset with small spread: a bfloat16 variance would be pure rounding noise.
    x = 100.0 + jax.random.normal(KEY, (2, 4, 4, 16))
    x_bf16 = x.astype(jnp.bfloat16)
    norm = GroupNorm32(groups=4, dtype=jnp.bfloat16)
    variables = norm.init(KEY, x_bf16)
    out = norm.apply(variables, x_bf16)
    assert out.dtype == jnp.bfloat16
    assert _param_dtypes(variables) == {jnp.dtype(jnp.float32)}
    ref = GroupNorm32(groups=4).apply(variables, x_bf16.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=0.05)
    assert float(jnp.std(ref)) == pytest.approx(1.0, abs=0.05)


def test_group_norm_falls_back_to_a_divisor_of_channels():
    x = jnp.ones((1, 2, 2, 12))
    variables = GroupNorm32(groups=8).init(KEY, x)  # gcd(8, 12) = 4 groups
    assert GroupNorm32(groups=8).apply(variables, x).shape == x.shape


@pytest.mark.parametrize("cond_dim", [None, 7])
def test_resblock_shapes_and_film(cond_dim):
    x = jax.random.normal(KEY, (2, 8, 8, 4))
    cond = None if cond_dim is None else jax.random.normal(KEY, (2, cond_dim))
    block = ResBlock(8, groups=4)
    variables = block.init(KEY, x, cond)
    out = block.apply(variables, x, cond)
    assert out.shape == (2, 8, 8, 8) and out.dtype == jnp.float32
    assert ("film" in variables["params"]) == (cond_dim is not None)
    if cond_dim is not None:
        # Zero-initialised FiLM: the conditioned block starts as the unconditioned one.
        out_other = block.apply(variables, x, cond + 5.0)
        np.testing.assert_allclose(out, out_other, atol=1e-6)


def test_resblock_bfloat16_compute_keeps_float32_params():
    x = jax.random.normal(KEY, (2, 8, 8, 8))
    block = ResBlock(8, groups=4, dtype=jnp.bfloat16, dropout=0.1)
    variables = block.init(KEY, x, jnp.ones((2, 3)))
    assert _param_dtypes(variables) == {jnp.dtype(jnp.float32)}
    out = block.apply(variables, x, jnp.ones((2, 3)), train=True, rngs={"dropout": KEY})
    assert out.dtype == jnp.bfloat16


def test_down_and_upsample():
    x = jnp.ones((2, 8, 8, 4))
    down = Downsample(6)
    y = down.apply(down.init(KEY, x), x)
    assert y.shape == (2, 4, 4, 6)
    up = Upsample(3)
    assert up.apply(up.init(KEY, y), y).shape == (2, 8, 8, 3)


def test_attention_self_and_cross_shapes():
    x = jax.random.normal(KEY, (2, 5, 16))
    context = jax.random.normal(KEY, (2, 7, 24))
    attn = Attention(num_heads=4)
    self_vars = attn.init(KEY, x)
    assert attn.apply(self_vars, x).shape == (2, 5, 16)
    cross_vars = attn.init(KEY, x, context)
    assert cross_vars["params"]["key"]["kernel"].shape == (24, 4, 4)
    assert attn.apply(cross_vars, x, context).shape == (2, 5, 16)
    # Feature maps are flattened to a sequence and restored.
    fmap = jax.random.normal(KEY, (2, 3, 3, 16))
    assert attn.apply(cross_vars, fmap, context).shape == (2, 3, 3, 16)


def test_attention_masked_keys_have_no_effect():
    x = jax.random.normal(KEY, (2, 5, 16))
    context = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 16))
    mask = jnp.arange(7)[None, :] < jnp.array([[4], [7]])
    attn = Attention(num_heads=2, head_dim=8)
    variables = attn.init(KEY, x, context, mask)
    out = attn.apply(variables, x, context, mask)
    changed = context.at[0, 5].set(100.0)
    np.testing.assert_allclose(attn.apply(variables, x, changed, mask), out, atol=1e-6)
    # The unmasked row does see the change.
    changed = context.at[1, 5].set(100.0)
    assert not np.allclose(attn.apply(variables, x, changed, mask)[1], out[1], atol=1e-3)


def test_attention_fully_masked_row_is_finite():
    x = jax.random.normal(KEY, (2, 5, 16))
    mask = jnp.zeros((2, 5), bool)
    attn = Attention(num_heads=2)
    variables = attn.init(KEY, x)
    assert np.isfinite(attn.apply(variables, x, mask=mask)).all()


def test_attention_bfloat16():
    x = jax.random.normal(KEY, (2, 5, 16))
    attn = Attention(num_heads=2, dtype=jnp.bfloat16)
    variables = attn.init(KEY, x)
    assert _param_dtypes(variables) == {jnp.dtype(jnp.float32)}
    assert attn.apply(variables, x).dtype == jnp.bfloat16


def test_mlp_shapes():
    mlp = MLP(32, dropout=0.5)
    x = jnp.ones((2, 3, 8))
    variables = mlp.init(KEY, x)
    assert mlp.apply(variables, x, train=True, rngs={"dropout": KEY}).shape == (2, 3, 8)


def test_transformer_block_self_and_cross():
    x = jax.random.normal(KEY, (2, 5, 16))
    context = jax.random.normal(KEY, (2, 7, 12))
    context_mask = jnp.arange(7)[None, :] < 3
    block = TransformerBlock(num_heads=2)
    variables = block.init(KEY, x)
    assert "cross_attn" not in variables["params"]
    assert block.apply(variables, x).shape == x.shape
    variables = block.init(KEY, x, context, context_mask=context_mask)
    assert "cross_attn" in variables["params"]
    out = block.apply(variables, x, context, context_mask=context_mask)
    assert out.shape == x.shape
    changed = context.at[:, 4:].set(9.0)
    np.testing.assert_allclose(
        block.apply(variables, x, changed, context_mask=context_mask), out, atol=1e-5
    )


def test_sinusoidal_embedding():
    emb = SinusoidalEmbedding(9).apply({}, jnp.array([0, 10, 999]))
    assert emb.shape == (3, 9) and emb.dtype == jnp.float32
    np.testing.assert_allclose(emb[0, :4], 1.0)  # cos(0)
    assert not np.allclose(emb[1], emb[2])
