import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax.models.vae import LOGVAR_RANGE, VAE, CondVAETiny, VAETiny

KEY = jax.random.PRNGKey(0)
RNGS = {"params": KEY, "noise": jax.random.PRNGKey(1)}
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


def test_shapes_dtypes_and_methods():
    images = jnp.zeros((2, 16, 16, 3))
    model = VAETiny(dtype=jnp.bfloat16)
    variables = model.init(RNGS, images)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    recon, aux = model.apply(variables, images, rngs={"noise": KEY})
    side = 16 // model.downsample_factor
    assert recon.shape == images.shape and recon.dtype == jnp.float32
    for name in ("mean", "logvar", "z"):
        assert aux[name].shape == (2, side, side, model.latent_channels)
        assert aux[name].dtype == jnp.float32
    mean, logvar = model.apply(variables, images, method=VAE.encode)
    assert mean.shape == aux["mean"].shape
    assert LOGVAR_RANGE[0] <= float(logvar.min()) and float(logvar.max()) <= LOGVAR_RANGE[1]
    decoded = model.apply(variables, mean, method=VAE.decode)
    assert decoded.shape == images.shape and decoded.dtype == jnp.float32


def test_posterior_sampling_uses_noise_rng():
    images = blobs(2)
    model = VAETiny()
    variables = model.init(RNGS, images)
    _, a = model.apply(variables, images, rngs={"noise": KEY})
    _, b = model.apply(variables, images, rngs={"noise": jax.random.PRNGKey(7)})
    assert not np.allclose(a["z"], b["z"])
    _, det = model.apply(variables, images, sample_posterior=False)
    np.testing.assert_array_equal(det["z"], det["mean"])


def test_text_conditioning_shares_one_encoder():
    images = blobs(2)
    model = CondVAETiny()
    variables = model.init(RNGS, images, TOKENS)
    params = variables["params"]
    assert [k for k in params if "text" in k] == ["text_encoder"]
    assert "film" in params["decoder"]["level0_block0"]
    assert "mid_cross_attn" in params["encoder"] and "mid_cross_attn" in params["decoder"]
    recon, aux = model.apply(variables, images, TOKENS, rngs={"noise": KEY})
    assert recon.shape == images.shape
    # FiLM starts at zero, so perturb it to check the caption reaches the decoder.
    params = jax.tree.map(lambda p: p + 0.05, params)
    z = jnp.zeros_like(aux["z"])
    a = model.apply({"params": params}, z, TOKENS, method=VAE.decode)
    b = model.apply({"params": params}, z, TOKENS[::-1], method=VAE.decode)
    assert not np.allclose(a[0], b[0], atol=1e-4)


def test_tokens_must_match_conditioning():
    images = blobs(2)
    with pytest.raises(ValueError, match="no text encoder"):
        VAETiny().init(RNGS, images, TOKENS)
    with pytest.raises(ValueError, match="needs tokens"):
        CondVAETiny().init(RNGS, images)


@pytest.mark.parametrize("conditional", [False, True])
def test_reconstruction_improves(conditional):
    images = blobs(16)
    model = CondVAETiny() if conditional else VAETiny()
    tokens = jnp.tile(TOKENS, (8, 1)) if conditional else None
    params = model.init(RNGS, images, tokens)["params"]
    tx = optax.adam(3e-3)

    def mse(params, rng):
        recon, aux = model.apply({"params": params}, images, tokens, rngs={"noise": rng})
        kl = 0.5 * jnp.mean(aux["mean"] ** 2 + jnp.exp(aux["logvar"]) - 1 - aux["logvar"])
        return jnp.mean((recon - images) ** 2), kl

    @jax.jit
    def step(params, opt_state, rng):
        def loss_fn(p):
            err, kl = mse(p, rng)
            return err + 1e-3 * kl

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    before = float(jax.jit(mse)(params, KEY)[0])
    opt_state = tx.init(params)
    for i in range(100):
        params, opt_state = step(params, opt_state, jax.random.PRNGKey(i))
    after = float(jax.jit(mse)(params, KEY)[0])
    assert np.isfinite(after) and after < 0.2 * before, (before, after)
