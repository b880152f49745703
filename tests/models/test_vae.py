import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax.models.vae import LOGVAR_RANGE, VAE, CondVAETiny, VAETiny
from tests.models.jit_helpers import KEY, key

RNGS = {"params": KEY, "noise": key(1)}
TOKENS = jnp.array([[1, 70, 71, 2, 0, 0], [1, 80, 81, 82, 83, 2]], jnp.int32)


def blobs(n: int, seed: int = 0, size: int = 16):
    """Smooth random images in [-1, 1]: learnable within a few dozen steps, unlike noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    images = np.full((n, size, size, 3), -1.0, np.float32)
    for i in range(n):
        cx, cy = rng.uniform(0.25, 0.75, 2)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.02)
        images[i] = -1 + 2 * blob[..., None] * rng.uniform(0, 1, 3)
    return jnp.asarray(images)


@pytest.fixture(scope="module")
def tiny():
    model = VAETiny()
    return model, jax.jit(model.init)(RNGS, blobs(2))


@pytest.fixture(scope="module")
def cond():
    model = CondVAETiny()
    return model, jax.jit(model.init)(RNGS, blobs(2), TOKENS)


def test_shapes_dtypes_and_methods():
    # eval_shape traces every method (so dtype promotion is fully checked) without compiling.
    images = blobs(2)
    model = VAETiny(dtype=jnp.bfloat16)
    variables = jax.eval_shape(model.init, RNGS, images)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    recon, aux = jax.eval_shape(
        functools.partial(model.apply, rngs={"noise": KEY}), variables, images
    )
    side = 16 // model.downsample_factor
    latent = (2, side, side, model.latent_channels)
    assert recon.shape == images.shape and recon.dtype == jnp.float32
    for name in ("mean", "logvar", "z"):
        assert aux[name].shape == latent and aux[name].dtype == jnp.float32
    encode = functools.partial(model.apply, method=VAE.encode)
    mean, logvar = jax.eval_shape(encode, variables, images)
    assert mean.shape == logvar.shape == latent
    decoded = jax.eval_shape(functools.partial(model.apply, method=VAE.decode), variables, mean)
    assert decoded.shape == images.shape and decoded.dtype == jnp.float32


def test_posterior_sampling_uses_noise_rng(tiny):
    model, variables = tiny
    images = blobs(2)
    apply = jax.jit(model.apply, static_argnames="sample_posterior")
    _, a = apply(variables, images, rngs={"noise": KEY})
    _, b = apply(variables, images, rngs={"noise": key(7)})
    assert not np.allclose(a["z"], b["z"])
    low, high = LOGVAR_RANGE
    assert low <= float(a["logvar"].min()) <= float(a["logvar"].max()) <= high
    _, det = apply(variables, images, sample_posterior=False)
    np.testing.assert_array_equal(det["z"], det["mean"])


def test_text_conditioning_shares_one_encoder(cond):
    model, variables = cond
    params = variables["params"]
    assert [k for k in params if "text" in k] == ["text_encoder"]
    assert "film" in params["decoder"]["level0_block0"]
    assert "mid_cross_attn" in params["encoder"] and "mid_cross_attn" in params["decoder"]
    # FiLM starts at zero, so perturb it to check the caption reaches the decoder.
    params = jax.tree.map(lambda p: p + 0.05, params)
    z = jnp.zeros((2, 8, 8, model.latent_channels))
    decode = jax.jit(functools.partial(model.apply, method=VAE.decode))
    a = decode({"params": params}, z, TOKENS)
    b = decode({"params": params}, z, TOKENS[::-1])
    assert not np.allclose(a[0], b[0], atol=1e-4)


def test_tokens_must_match_conditioning():
    images = blobs(2)
    with pytest.raises(ValueError, match="no text encoder"):
        jax.eval_shape(VAETiny().init, RNGS, images, TOKENS)
    with pytest.raises(ValueError, match="needs tokens"):
        jax.eval_shape(CondVAETiny().init, RNGS, images)


@pytest.mark.e2e
def test_reconstruction_improves(tiny):
    # The unconditional model: the conditional one costs twice the compile time, and its
    # training path is exercised by the trainer's tiny run.
    model, variables = tiny
    images = blobs(16)
    tokens = None
    tx = optax.adam(3e-3)

    def losses(params, rng):
        recon, aux = model.apply({"params": params}, images, tokens, rngs={"noise": rng})
        kl = 0.5 * jnp.mean(aux["mean"] ** 2 + jnp.exp(aux["logvar"]) - 1 - aux["logvar"])
        return jnp.mean((recon - images) ** 2), kl

    @jax.jit
    def step(params, opt_state, rng):
        def loss_fn(p):
            mse, kl = losses(p, rng)
            return mse + 1e-3 * kl, mse

        (_, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, mse

    params = variables["params"]
    opt_state = tx.init(params)
    history = []
    for i in range(100):
        params, opt_state, mse = step(params, opt_state, key(i))
        history.append(mse)
    before, after = float(history[0]), float(np.mean(history[-5:]))
    assert np.isfinite(after) and after < 0.2 * before, (before, after)
