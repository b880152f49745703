"""GAN modules: shapes and dtypes, z+ codes, spectral normalisation, self-attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.gan import SPECTRAL, GANTiny, SNConv, SNDense, spectral_normalize


def _inputs(n=4, size=16, z_dim=16):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    z = jax.random.normal(k1, (n, z_dim))
    tokens = jax.random.randint(k2, (n, 12), 3, 200)
    images = jax.random.uniform(k3, (n, size, size, 3), minval=-1, maxval=1)
    return z, tokens, images


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shapes_and_dtypes(dtype):
    model = GANTiny(dtype=dtype)
    z, tokens, images = _inputs()
    variables = model.init(jax.random.key(1), z, tokens, images)
    assert set(variables["params"]) == {"generator", "discriminator"}
    for leaf in jax.tree.leaves(variables["params"]):
        assert leaf.dtype == jnp.float32
    fake = model.apply(variables, z, tokens, method=model.generate)
    assert fake.shape == (4, 16, 16, 3) and fake.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(fake))) <= 1.0
    logits = model.apply(variables, images, tokens, method=model.discriminate)
    assert logits.shape == (4,) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))


def test_z_plus_codes_and_bad_z():
    model = GANTiny()
    z, tokens, images = _inputs()
    variables = model.init(jax.random.key(1), z, tokens, images)
    plain = model.apply(variables, z, tokens, method=model.generate)
    # The same z in every layer is the plain code ...
    plus = jnp.broadcast_to(z[:, None], (4, model.num_layers, z.shape[-1]))
    np.testing.assert_allclose(model.apply(variables, plus, tokens, method=model.generate), plain, atol=1e-6)
    # ... and a different z in one layer changes the image. (Only the stem's: the blocks'
    # conditional norms start at zero, so z moves them once training has moved them.)
    changed = plus.at[:, 0].set(-plus[:, 0])
    assert float(jnp.max(jnp.abs(model.apply(variables, changed, tokens, method=model.generate) - plain))) > 1e-3
    # A per-layer caption vector: the same in every layer is the plain one.
    text = model.apply(variables, tokens, method=model.encode_text)
    per_layer = jnp.broadcast_to(text[:, None], (4, model.num_layers, text.shape[-1]))
    np.testing.assert_allclose(model.apply(variables, z, per_layer, method=model.synthesize), plain, atol=1e-6)
    with pytest.raises(ValueError, match="text must be"):
        model.apply(variables, z, per_layer[:, :2], method=model.synthesize)
    with pytest.raises(ValueError, match="z must be"):
        model.apply(variables, jnp.zeros((4, model.num_layers + 1, 16)), tokens, method=model.generate)


def test_each_image_is_generated_independently_of_its_batch():
    # Batch-independent normalisation: inversion under vmap and sharded sampling rely on it.
    model = GANTiny()
    z, tokens, images = _inputs(n=6)
    variables = model.init(jax.random.key(1), z, tokens, images)
    whole = model.apply(variables, z, tokens, method=model.generate)
    alone = model.apply(variables, z[2:3], tokens[2:3], method=model.generate)
    np.testing.assert_allclose(alone[0], whole[2], atol=1e-5)


def _largest_singular_value(kernel):
    return float(np.linalg.svd(np.asarray(kernel).reshape(-1, kernel.shape[-1]), compute_uv=False)[0])


def test_spectral_norm_keeps_largest_singular_value_near_one():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 5))
    conv = SNConv(7, 3)
    variables = conv.init(jax.random.key(1), x)
    kernel = variables["params"]["sn"]["kernel"]
    u = variables[SPECTRAL]["sn"]["u"]
    assert _largest_singular_value(kernel) > 1.3  # the raw kernel is not normalised
    normalized, _, sigma = spectral_normalize(kernel, u, 1)
    assert _largest_singular_value(normalized) == pytest.approx(1.0, abs=0.02)
    assert float(sigma) == pytest.approx(_largest_singular_value(kernel), rel=0.02)

    # A kernel that moves a little each step is tracked by one power iteration per update.
    dense = SNDense(6)
    h = jax.random.normal(jax.random.key(2), (3, 10))
    v = dense.init(jax.random.key(3), h)
    params, spectral = v["params"], v[SPECTRAL]
    for i in range(30):
        params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.fold_in(jax.random.key(4), i), p.shape),
                              params)
        _, new = dense.apply({"params": params, SPECTRAL: spectral}, h, True, mutable=[SPECTRAL])
        assert not np.allclose(new[SPECTRAL]["sn"]["u"], spectral["sn"]["u"])  # update=True moves u
        spectral = new[SPECTRAL]
    normalized, _, _ = spectral_normalize(params["sn"]["kernel"], spectral["sn"]["u"], 0)
    assert _largest_singular_value(normalized) == pytest.approx(1.0, abs=0.05)
    # Without update, u stays.
    _, same = dense.apply({"params": params, SPECTRAL: spectral}, h, False, mutable=[SPECTRAL])
    np.testing.assert_array_equal(same[SPECTRAL]["sn"]["u"], spectral["sn"]["u"])


def test_spectral_norm_gradient_sees_the_normalisation():
    # d(sigma)/dW is part of the gradient: scaling the kernel leaves the output unchanged, so
    # the gradient along the kernel itself is zero.
    x = jax.random.normal(jax.random.key(0), (4, 10))
    dense = SNDense(6, use_bias=False)
    v = dense.init(jax.random.key(1), x)
    kernel = v["params"]["sn"]["kernel"]
    u = v[SPECTRAL]["sn"]["u"]

    def out(k):
        normalized, _, _ = spectral_normalize(k, u, 3)
        return jnp.sum(jnp.sin(x @ normalized))

    grad = jax.grad(out)(kernel)
    assert abs(float(jnp.sum(grad * kernel))) < 1e-3 * float(jnp.linalg.norm(grad) * jnp.linalg.norm(kernel))
    assert float(jnp.linalg.norm(grad)) > 1e-3
