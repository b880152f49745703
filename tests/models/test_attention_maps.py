"""Cross-attention maps: the explicit path computes the same function as the fused one, and it
is traced only when the "attention_maps" collection is asked for."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import layers
from mmjax.models.layers import Attention, attention, attention_with_weights
from mmjax.models.unet import UNet, UNetTiny
from tests.models.jit_helpers import KEY, init, key

MAPS = ["attention_maps"]


def _inputs():
    x = jax.random.normal(KEY, (2, 3, 3, 16))
    context = jax.random.normal(key(1), (2, 7, 12))
    mask = jnp.arange(7)[None, :] < jnp.array([[4], [7]])
    return x, context, mask


@pytest.mark.parametrize("masked_from", [[3, 7], [0, 5], None])
def test_attention_with_weights_matches_fused_attention(masked_from):
    q, k, v = (jax.random.normal(key(i), (2, 6, 2, 8)) for i in range(3))
    mask = None if masked_from is None else jnp.arange(6)[None, :] < jnp.asarray(masked_from)[:, None]
    out, weights = attention_with_weights(q, k, v, mask)
    np.testing.assert_allclose(out, attention(q, k, v, mask, "xla"), atol=1e-5)
    assert weights.shape == (2, 2, 6, 6) and weights.dtype == jnp.float32
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
    if masked_from is not None and masked_from[0]:
        assert float(jnp.abs(weights[0, ..., masked_from[0]:]).max()) == 0.0


def test_cross_attention_sows_maps_only_when_asked():
    x, context, mask = _inputs()
    attn = Attention(num_heads=2)
    variables = init(attn, x, context, mask)
    assert set(variables) == {"params"}  # init never sows
    plain = jax.jit(lambda v: attn.apply(v, x, context, mask))(variables)
    out, state = jax.jit(lambda v: attn.apply(v, x, context, mask, mutable=MAPS))(variables)
    np.testing.assert_allclose(out, plain, atol=1e-5)
    (maps,) = state["attention_maps"]["weights"]
    assert maps.shape == (2, 3, 3, 7) and maps.dtype == jnp.float32  # feature-map axes restored
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)
    assert float(jnp.abs(maps[0, ..., 4:]).max()) == 0.0  # padded keys get nothing
    # Self-attention never sows, asked or not.
    self_vars = init(attn, x)
    _, state = attn.apply(self_vars, x, mutable=MAPS)
    assert not state.get("attention_maps")


@pytest.fixture(scope="module")
def unet():
    model = UNetTiny()
    x = jax.random.normal(key(2), (2, 16, 16, 3))
    t = jnp.array([10, 900], jnp.int32)
    tokens = jnp.array([[1, 70, 71, 2, 0, 0], [1, 80, 81, 82, 83, 2]], jnp.int32)
    variables = init(model, x, t, tokens)
    # Perturbed: the zero-initialised output conv would hide any difference upstream.
    leaves, treedef = jax.tree.flatten(variables)
    rng = np.random.default_rng(0)
    variables = jax.tree.unflatten(
        treedef, [p + 0.05 * rng.standard_normal(p.shape).astype(p.dtype) for p in leaves]
    )
    text = model.apply(variables, tokens, method=UNet.encode_text)
    return model, variables, x, t, text


def test_unet_map_path_equals_fast_path(unet):
    model, variables, x, t, text = unet
    denoise = lambda v, **kw: model.apply(v, x, t, text, method=UNet.denoise, **kw)  # noqa: E731
    plain = jax.jit(denoise)(variables)
    out, state = jax.jit(lambda v: denoise(v, mutable=MAPS))(variables)
    assert float(jnp.abs(plain).max()) > 1e-3  # the comparison below is not 0 == 0
    np.testing.assert_allclose(out, plain, atol=1e-5)
    maps = state["attention_maps"]
    # UNetTiny cross-attends at level 1 (8x8 for 16x16 inputs): down, mid and two up blocks.
    assert sorted(maps) == ["down1_block0_cross_attn", "mid_cross_attn", "up1_block0_cross_attn",
                            "up1_block1_cross_attn"]
    for layer in jax.tree.leaves(maps):
        assert layer.shape == (2, 8, 8, 6)
        np.testing.assert_allclose(layer.sum(-1), 1.0, atol=1e-5)
        assert float(jnp.abs(layer[0, ..., 4:]).max()) == 0.0  # caption 0 has 4 real tokens


def test_unet_without_the_collection_never_traces_the_map_path(unet, monkeypatch):
    model, variables, x, t, text = unet

    def forbidden(*args, **kwargs):
        raise AssertionError("the explicit attention path was traced without being asked for")

    monkeypatch.setattr(layers, "attention_with_weights", forbidden)
    out = jax.eval_shape(lambda v: model.apply(v, x, t, text, method=UNet.denoise), variables)
    assert out.shape == x.shape
    _, state = jax.eval_shape(
        lambda v: model.apply(v, x, t, text, method=UNet.denoise, mutable=["intermediates"]), variables
    )
    assert "attention_maps" not in state
    with pytest.raises(AssertionError, match="traced"):
        jax.eval_shape(lambda v: model.apply(v, x, t, text, method=UNet.denoise, mutable=MAPS), variables)
