
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.text import TextEncoder, TextEncoderTiny
from tests.models.jit_helpers import KEY, apply, init, key

TOKENS = jnp.array([[1, 70, 71, 72, 2, 0, 0, 0], [1, 80, 81, 82, 83, 84, 2, 0]], jnp.int32)


@pytest.fixture(scope="module")
def tiny():
    model = TextEncoderTiny()
    return model, init(model, TOKENS)


def test_shapes_and_dtypes(tiny):
    model, variables = tiny
    context, aux = apply(model, variables, TOKENS)
    assert context.shape == (2, 8, model.width) and context.dtype == jnp.float32
    assert aux["pooled"].shape == (2, model.width) and aux["pooled"].dtype == jnp.float32
    np.testing.assert_array_equal(aux["mask"], TOKENS != 0)


def test_bfloat16_compute_float32_params(tiny):
    _, variables = tiny
    model = TextEncoderTiny(dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(jax.eval_shape(model.init, KEY, TOKENS))} == {
        jnp.dtype(jnp.float32)
    }
    context, aux = apply(model, variables, TOKENS)
    assert context.dtype == jnp.float32 and aux["pooled"].dtype == jnp.float32
    reference, _ = apply(TextEncoderTiny(), variables, TOKENS)
    np.testing.assert_allclose(context, reference, atol=0.1)


def test_appended_padding_changes_nothing(tiny):
    model, variables = tiny
    context, aux = apply(model, variables, TOKENS)
    padded = jnp.pad(TOKENS, ((0, 0), (0, 5)))
    context_padded, aux_padded = apply(model, variables, padded)
    np.testing.assert_allclose(aux_padded["pooled"], aux["pooled"], atol=1e-5)
    real = np.asarray(TOKENS != 0)
    np.testing.assert_allclose(
        np.asarray(context_padded[:, :8])[real], np.asarray(context)[real], atol=1e-5
    )


def test_all_padding_is_finite(tiny):
    model, variables = tiny
    tokens = jnp.zeros((2, 8), jnp.int32)
    context, aux = apply(model, variables, tokens)
    assert np.isfinite(context).all() and np.isfinite(aux["pooled"]).all()
    grads = jax.jit(jax.grad(lambda v: model.apply(v, tokens)[1]["pooled"].sum()))(variables)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_captions_differ(tiny):
    model, variables = tiny
    _, aux = apply(model, variables, TOKENS)
    assert not np.allclose(aux["pooled"][0], aux["pooled"][1], atol=1e-4)


def test_too_long_raises():
    model = TextEncoder(width=16, depth=1, num_heads=2, max_len=4)
    with pytest.raises(ValueError, match="max_len"):
        init(model, TOKENS)


def test_dropout_uses_rng(tiny):
    model = TextEncoderTiny(dropout=0.5)
    variables = init(model, TOKENS)
    a = apply(model, variables, TOKENS, train=True, rngs={"dropout": KEY})[1]["pooled"]
    b = apply(model, variables, TOKENS, train=True, rngs={"dropout": key(1)})[1]
    assert not np.allclose(a, b["pooled"])
