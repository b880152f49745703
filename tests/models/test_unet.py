import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.unet import DDPM32, LDM64, UNet, UNetTiny
from tests.models.jit_helpers import KEY, apply, init

X = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
T = jnp.array([10, 900], jnp.int32)
TOKENS = jnp.array([[1, 70, 71, 2, 0, 0], [1, 80, 81, 82, 83, 2]], jnp.int32)


def count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def tiny():
    model = UNetTiny()
    return model, init(model, X, T, TOKENS)


@pytest.fixture(scope="module")
def perturbed(tiny):
    # The output conv starts at zero, which hides everything upstream; random offsets on every
    # parameter make each input's influence visible.
    model, variables = tiny
    leaves, treedef = jax.tree.flatten(variables)
    rng = np.random.default_rng(0)
    leaves = [p + 0.05 * rng.standard_normal(p.shape).astype(p.dtype) for p in leaves]
    return model, jax.tree.unflatten(treedef, leaves)


def test_output_is_zero_at_init(tiny):
    model, variables = tiny
    out = apply(model, variables, X, T, TOKENS)
    assert out.shape == X.shape and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, 0.0)


def test_latent_inputs_and_shapes():
    # eval_shape traces init and apply without compiling, which is all a shape check needs.
    latent = jnp.zeros((2, 8, 8, 8))
    model = UNetTiny(out_channels=8)
    variables = jax.eval_shape(model.init, KEY, latent, T, TOKENS)
    out = jax.eval_shape(model.apply, variables, latent, T, TOKENS)
    assert out.shape == latent.shape and out.dtype == jnp.float32
    assert variables["params"]["conv_in"]["kernel"].shape[2] == 8


def test_bfloat16_compute_float32_params(perturbed):
    _, variables = perturbed
    model = UNetTiny(dtype=jnp.bfloat16)
    abstract = jax.eval_shape(model.init, KEY, X, T, TOKENS)
    assert {leaf.dtype for leaf in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}
    out = apply(model, variables, X, T, TOKENS)
    assert out.dtype == jnp.float32 and np.isfinite(out).all()
    reference = apply(UNetTiny(), variables, X, T, TOKENS)
    scale = float(np.abs(reference).mean())
    assert scale > 1e-3
    assert float(np.abs(out - reference).mean()) < 0.1 * scale


def test_output_depends_on_x_t_and_caption(perturbed):
    model, variables = perturbed
    out = apply(model, variables, X, T, TOKENS)
    assert np.isfinite(out).all()
    changed_x = apply(model, variables, X.at[:, :4].set(0.0), T, TOKENS)
    changed_t = apply(model, variables, X, T + 100, TOKENS)
    changed_caption = apply(model, variables, X, T, TOKENS.at[:, 1].set(99))
    for other in (changed_x, changed_t, changed_caption):
        for i in range(2):  # every example, not just the batch as a whole
            assert not np.allclose(out[i], other[i], atol=1e-4)


def test_encode_text_then_denoise_matches_call(perturbed):
    model, variables = perturbed
    text = apply(model, variables, TOKENS, method=UNet.encode_text)
    assert text["context"].shape == (2, TOKENS.shape[1], 32)
    assert text["pooled"].shape == (2, 32)
    np.testing.assert_array_equal(text["mask"], TOKENS != 0)
    split = apply(model, variables, X, T, text, method=UNet.denoise)
    np.testing.assert_allclose(split, apply(model, variables, X, T, TOKENS), atol=1e-5)
    # A scalar timestep is broadcast over the batch, as samplers pass it.
    scalar = apply(model, variables, X, jnp.int32(10), text, method=UNet.denoise)
    np.testing.assert_allclose(
        scalar[0], apply(model, variables, X, jnp.full((2,), 10), text, method=UNet.denoise)[0],
        atol=1e-5,
    )


def test_appended_padding_changes_nothing(perturbed):
    model, variables = perturbed
    text = apply(model, variables, TOKENS, method=UNet.encode_text)
    padded = apply(model, variables, jnp.pad(TOKENS, ((0, 0), (0, 5))), method=UNet.encode_text)
    out = apply(model, variables, X, T, text, method=UNet.denoise)
    out_padded = apply(model, variables, X, T, padded, method=UNet.denoise)
    assert float(np.abs(out).mean()) > 1e-3
    np.testing.assert_allclose(out_padded, out, atol=1e-4)


def test_parameter_counts():
    def params(ctor, size, channels):
        model = ctor()
        tokens = None if model.text is None else jnp.ones((1, 8), jnp.int32)
        x = jnp.zeros((1, size, size, channels))
        return jax.eval_shape(model.init, KEY, x, jnp.zeros((1,)), tokens)["params"]

    ddpm = params(DDPM32, 32, 3)
    assert "text_encoder" not in ddpm
    assert abs(count(ddpm) - 35.7e6) < 0.02 * 35.7e6, count(ddpm)  # measured 35,746,307
    ldm = params(LDM64, 64, 4)
    unet = count(ldm) - count(ldm["text_encoder"])
    assert abs(unet - 160e6) < 0.1 * 160e6, unet  # measured 146,711,620 (+13.0M text)
    # Heads of 64 channels: 3 at width 192, 12 in the 768-wide middle; the same parameters.
    assert ldm["down0_block0_attn"]["attn"]["query"]["kernel"].shape == (192, 3, 64)
    assert ldm["mid_attn"]["attn"]["query"]["kernel"].shape == (768, 12, 64)
    eight_heads = params(lambda: LDM64(channels_per_head=None, num_heads=8), 64, 4)
    assert count(eight_heads) == count(ldm)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="15x15 is not divisible by 2"):
        jax.eval_shape(UNetTiny().init, KEY, jnp.zeros((1, 15, 15, 3)), T[:1], TOKENS[:1])
    with pytest.raises(ValueError, match="36x36 is not divisible by 8"):
        jax.eval_shape(DDPM32().init, KEY, jnp.zeros((1, 36, 36, 3)), T[:1])
    with pytest.raises(ValueError, match="cross_attn_levels needs a text encoder"):
        jax.eval_shape(UNet(cross_attn_levels=(0,)).init, KEY, X, T)
    with pytest.raises(ValueError, match="reads captions; pass tokens"):
        jax.eval_shape(UNetTiny().init, KEY, X, T)
    with pytest.raises(ValueError, match="unconditional"):
        jax.eval_shape(UNet(channel_mults=(1, 2)).init, KEY, X, T, TOKENS)
