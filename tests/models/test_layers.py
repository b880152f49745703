
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


def _attention_inputs(keys_len, masked_from=None, queries=6):
    kq, kk, kv = jax.random.split(jax.random.key(7), 3)
    q = jax.random.normal(kq, (2, queries, 2, 8))
    k = jax.random.normal(kk, (2, keys_len, 2, 8))
    v = jax.random.normal(kv, (2, keys_len, 2, 8))
    mask = None
    if masked_from is not None:
        mask = jnp.arange(keys_len)[None, :] < jnp.asarray(masked_from)[:, None]
    return q, k, v, mask


@pytest.mark.parametrize("keys_len,masked_from,queries",
                         [(7, None, 6), (7, [3, 0], 6), (8, [5, 8], 6), (7, [3, 7], 7), (8, None, 5)])
def test_cudnn_attention_padding_and_mask_broadcast_compute_the_same_function(monkeypatch, keys_len, masked_from,
                                                                               queries):
    # cuDNN takes a key mask only as a [B, 1, T, S] bias with even T and S: `_cudnn_attention`
    # pads queries and keys (masked) and broadcasts the mask. Run that rewrite through XLA's
    # kernel here (no GPU on CI) and check it changes nothing, the all-masked row included.
    from mmjax.models import layers

    q, k, v, mask = _attention_inputs(keys_len, masked_from, queries)
    expected = layers.attention(q, k, v, mask, "xla")
    seen = {}
    real = jax.nn.dot_product_attention

    def through_xla(q, k, v, mask=None, implementation=None):
        seen["keys"], seen["mask"] = k.shape[1], None if mask is None else mask.shape
        return real(q, k, v, mask=mask, implementation="xla")

    monkeypatch.setattr(layers.jax.nn, "dot_product_attention", through_xla)
    out = layers.attention(q, k, v, mask, "cudnn")
    assert seen["keys"] % 2 == 0 and out.shape == q.shape
    if mask is not None or keys_len % 2 or queries % 2:
        assert seen["mask"] == (2, 1, queries + queries % 2, seen["keys"])
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5)
    if masked_from is not None and 0 in masked_from:
        row = masked_from.index(0)  # every key masked: attends to all real keys, never the pad
        unmasked = real(q, k, v, implementation="xla")
        np.testing.assert_allclose(np.asarray(out[row]), np.asarray(unmasked[row]), atol=1e-5)


def test_attention_auto_runs_xla_off_gpu_and_rejects_unknown_implementations():
    q, k, v, mask = _attention_inputs(5, [2, 5])
    auto = jax.jit(lambda q, k, v, m: __import__("mmjax.models.layers", fromlist=["x"]).attention(q, k, v, m))
    assert "cudnn" not in auto.lower(q, k, v, mask).as_text()
    from mmjax.models.layers import attention

    np.testing.assert_allclose(np.asarray(attention(q, k, v, mask)), np.asarray(attention(q, k, v, mask, "xla")))
    with pytest.raises(ValueError, match="implementation"):
        attention(q, k, v, mask, "flash")
