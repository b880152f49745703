
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


# ----------------------------------------------------------------------------- position schemes

def test_rotary_scores_depend_only_on_relative_position():
    from mmjax.models.layers import rotary

    q = jax.random.normal(key(1), (1, 1, 2, 8))
    k = jax.random.normal(key(2), (1, 1, 2, 8))

    def score(i, j):  # q placed at position i, k at position j, in a row of 12
        rows = jnp.zeros((2, 12, 2, 8)).at[0, i].set(q[0, 0]).at[1, j].set(k[0, 0])
        rotated = rotary(rows)
        return float(jnp.sum(rotated[0, i] * rotated[1, j]))

    assert score(3, 5) == pytest.approx(score(7, 9), abs=1e-4)
    assert score(3, 5) != pytest.approx(score(3, 8), abs=1e-3)
    x = jax.random.normal(key(3), (2, 12, 2, 8))
    np.testing.assert_allclose(jnp.linalg.norm(rotary(x), axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    with pytest.raises(ValueError, match="even head dim"):
        rotary(jnp.zeros((1, 2, 1, 3)))


@pytest.mark.parametrize("positions", ["rotary", "none"])
def test_relative_and_no_positions_have_no_position_table(positions):
    model = TextEncoderTiny(positions=positions)
    variables = init(model, TOKENS)
    assert "pos_embed" not in variables["params"] and "pos_embed" in init(TextEncoderTiny(), TOKENS)["params"]
    context, aux = apply(model, variables, TOKENS)
    padded = jnp.pad(TOKENS, ((0, 0), (0, 4)))
    context2, aux2 = apply(model, variables, padded)
    np.testing.assert_allclose(aux["pooled"], aux2["pooled"], atol=1e-5)
    np.testing.assert_allclose(context[:, :5], context2[:, :5], atol=1e-5)


def test_rotary_sees_word_order_and_none_does_not():
    swapped = TOKENS.at[0, 1].set(71).at[0, 2].set(70)  # first two words swapped
    pooled = {}
    for positions in ("rotary", "none"):
        model = TextEncoderTiny(positions=positions)
        variables = init(model, TOKENS)
        pooled[positions] = [apply(model, variables, t)[1]["pooled"][0] for t in (TOKENS, swapped)]
    assert not np.allclose(*pooled["rotary"], atol=1e-4)
    np.testing.assert_allclose(*pooled["none"], atol=1e-5)


def test_unknown_position_scheme_is_refused():
    with pytest.raises(ValueError, match="positions must be one of"):
        init(TextEncoderTiny(positions="absolute"), TOKENS)
