"""The diffusion transformer: patches, adaLN-Zero, both block kinds, scan against the unrolled loop."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import dit
from mmjax.models.layers import MAPS

X = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 4)), jnp.float32)
T = jnp.array([3.0, 700.0])
TOKENS = jnp.array([[1, 5, 6, 7, 2, 0, 0, 0], [1, 9, 2, 0, 0, 0, 0, 0]], jnp.int32)


def _perturbed(variables, seed=1):
    """Every weight moved off its initial value, so zero-initialised layers do something."""
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _unstack(params, depth):
    """Scanned params (`blocks/block/...` with a leading depth axis) -> `blocks_{i}/block/...`."""
    params = flax.core.unfreeze(params)
    stacked = params.pop("blocks")
    for i in range(depth):
        params[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return params


def test_patchify_round_trip():
    tokens = dit.patchify(X, 2)
    assert tokens.shape == (2, 16, 16)
    np.testing.assert_array_equal(tokens[0, 1], X[0, 0:2, 2:4].reshape(-1))  # row-major patches
    np.testing.assert_array_equal(dit.unpatchify(tokens, (4, 4), 2), X)


def test_sincos_positions_are_distinct_and_bounded():
    pos = dit.sincos_2d(4, 4, 32)
    assert pos.shape == (16, 32) and np.abs(pos).max() <= 1
    distances = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    assert np.all(distances[~np.eye(16, dtype=bool)] > 0.1)
    with pytest.raises(ValueError, match="divisible by 4"):
        dit.sincos_2d(4, 4, 30)


@pytest.mark.parametrize("block", dit.BLOCKS)
def test_fresh_model_predicts_zero_and_scan_matches_the_loop(block):
    scanned = dit.DiTTiny(out_channels=4, block=block)
    variables = scanned.init(jax.random.key(0), X, T, TOKENS)
    out = scanned.apply(variables, X, T, TOKENS)
    assert out.shape == X.shape and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, 0.0)  # adaLN-Zero and a zero final layer
    params = _perturbed(variables["params"])
    out = scanned.apply({"params": params}, X, T, TOKENS)
    assert float(jnp.std(out)) > 1e-3
    looped = dit.DiTTiny(out_channels=4, block=block, scan=False)
    np.testing.assert_allclose(looped.apply({"params": _unstack(params, 2)}, X, T, TOKENS), out, atol=1e-5)
    # remat changes memory, not results or gradients.
    remat = dit.DiTTiny(out_channels=4, block=block, remat=True)
    np.testing.assert_allclose(remat.apply({"params": params}, X, T, TOKENS), out, atol=1e-6)
    loss = lambda model, p: jnp.mean(jnp.square(model.apply({"params": p}, X, T, TOKENS)))  # noqa: E731
    g1, g2 = jax.grad(functools.partial(loss, scanned))(params), jax.grad(functools.partial(loss, remat))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)


@pytest.mark.parametrize("block", dit.BLOCKS)
def test_caption_padding_and_conditioning(block):
    model = dit.DiTTiny(out_channels=4, block=block)
    params = _perturbed(model.init(jax.random.key(0), X, T, TOKENS)["params"])
    out = model.apply({"params": params}, X, T, TOKENS)
    longer = jnp.pad(TOKENS, ((0, 0), (0, 4)))  # more padding: same caption
    np.testing.assert_allclose(model.apply({"params": params}, X, T, longer), out, atol=1e-5)
    other = TOKENS.at[:, 1].set(11)
    assert float(jnp.max(jnp.abs(model.apply({"params": params}, X, T, other) - out))) > 1e-3
    assert float(jnp.max(jnp.abs(model.apply({"params": params}, X, T[::-1], TOKENS) - out))) > 1e-3


@pytest.mark.parametrize("block", dit.BLOCKS)
def test_attention_maps_are_sown_only_when_asked(block):
    model = dit.DiTTiny(out_channels=4, block=block)
    params = _perturbed(model.init(jax.random.key(0), X, T, TOKENS)["params"])
    out, state = model.apply({"params": params}, X, T, TOKENS, mutable=[MAPS])
    (maps,) = jax.tree.leaves(state[MAPS])
    assert maps.shape == (2, 2, 4, 4, TOKENS.shape[1])  # [depth, B, h, w, L]
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(maps[..., 5:], 0.0, atol=1e-7)  # padding gets no attention
    np.testing.assert_allclose(out, model.apply({"params": params}, X, T, TOKENS), atol=1e-5)


def test_unconditional_and_bad_arguments():
    model = dit.DiTTiny(out_channels=4, text=None)
    variables = model.init(jax.random.key(0), X, T)
    assert model.apply(variables, X, T).shape == X.shape
    with pytest.raises(ValueError, match="unconditional"):
        model.apply(variables, TOKENS, method=dit.DiT.encode_text)
    with pytest.raises(ValueError, match="block must be one of"):
        dit.DiTTiny(block="parallel").init(jax.random.key(0), X, T, TOKENS)
    with pytest.raises(ValueError, match="joint-attention DiT needs a text encoder"):
        dit.DiTTiny(block="joint", text=None).init(jax.random.key(0), X, T)
    with pytest.raises(ValueError, match="not divisible by patch_size 3"):
        dit.DiTTiny(patch_size=3).init(jax.random.key(0), X, T, TOKENS)


def test_scanned_program_does_not_grow_with_depth():
    """The compile-time property: one traced block whatever the depth (the loop grows)."""
    def size(depth, scan):
        model = dit.DiTTiny(out_channels=4, depth=depth, scan=scan)
        shapes = jax.eval_shape(model.init, jax.random.key(0), X, T, TOKENS)
        return len(jax.jit(lambda v: model.apply(v, X, T, TOKENS)).lower(shapes).as_text().splitlines())

    scanned_2, scanned_8 = size(2, True), size(8, True)
    looped_2, looped_8 = size(2, False), size(8, False)
    assert scanned_8 == scanned_2, (scanned_2, scanned_8)
    assert looped_8 > 2 * looped_2, (looped_2, looped_8)
