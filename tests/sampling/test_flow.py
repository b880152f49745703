"""Flow matching against a Gaussian mixture, whose true velocity field is known in closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.sampling import flow

# A 2-D mixture of three Gaussians: weights, means, standard deviations.
WEIGHTS = np.array([0.5, 0.3, 0.2])
MEANS = np.array([[2.0, 0.0], [-1.5, 1.5], [0.0, -2.0]])
STDS = np.array([0.6, 0.8, 0.7])


def true_velocity(x, t):
    """E[noise - x0 | x_t = x] under x_t = (1 - t) x0 + t noise, x0 ~ mixture, noise ~ N(0, I).

    Given component k, (x0, noise, x_t) are jointly Gaussian: x_t ~ N((1-t) m_k, var_k I) with
    var_k = (1-t)^2 s_k^2 + t^2, E[x0 | x_t] = m_k + (1-t) s_k^2 / var_k (x - (1-t) m_k) and
    E[noise | x_t] = t / var_k (x - (1-t) m_k). The field mixes them by the posterior weights."""
    t = t[:, None, None]  # [B, 1, 1] against components [1, K, 1]
    means, s2 = jnp.asarray(MEANS)[None], jnp.asarray(STDS**2)[None, :, None]
    var = (1 - t) ** 2 * s2 + t**2
    centred = x[:, None, :] - (1 - t) * means  # [B, K, 2]
    log_w = (jnp.log(jnp.asarray(WEIGHTS))[None] - jnp.sum(centred**2, -1) / (2 * var[..., 0])
             - jnp.log(var[..., 0]))  # 2-D Gaussian: the normaliser is 1 / var
    gamma = jax.nn.softmax(log_w, axis=1)[..., None]
    e_x0 = means + (1 - t) * s2 / var * centred
    e_noise = t / var * centred
    return jnp.sum(gamma * (e_noise - e_x0), axis=1)


def draw_data(key, n):
    k1, k2 = jax.random.split(key)
    comp = jax.random.choice(k1, 3, (n,), p=jnp.asarray(WEIGHTS))
    return jnp.asarray(MEANS)[comp] + jnp.asarray(STDS)[comp, None] * jax.random.normal(k2, (n, 2)), comp


@pytest.fixture(scope="module", autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def test_solvers_converge_at_their_orders():
    noise = jax.random.normal(jax.random.key(0), (256, 2), jnp.float64)
    reference = flow.integrate(true_velocity, noise, np.linspace(1.0, 0.0, 4097), "heun")
    for solver, order in (("euler", 1), ("heun", 2)):
        errors = []
        for steps in (8, 16, 32, 64):
            out = flow.integrate(true_velocity, noise, np.linspace(1.0, 0.0, steps + 1), solver)
            errors.append(float(jnp.sqrt(jnp.mean(jnp.sum((out - reference) ** 2, -1)))))
        rates = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
        # Halving the step divides the error by 2^order (asymptotically).
        assert np.all(np.abs(rates[-2:] - order) < 0.3), (solver, errors, rates)
    assert errors[-1] < 1e-3


def test_sampling_the_true_field_draws_the_mixture():
    noise = jax.random.normal(jax.random.key(1), (4000, 2))
    x = flow.sample(true_velocity, noise, steps=64, solver="heun", shift=3.0)
    # Each sample lands near one mean; the share per component matches the weights.
    nearest = np.argmin(np.linalg.norm(np.asarray(x)[:, None] - MEANS[None], axis=-1), axis=1)
    shares = np.bincount(nearest, minlength=3) / len(nearest)
    np.testing.assert_allclose(shares, WEIGHTS, atol=0.03)
    data, _ = draw_data(jax.random.key(2), 4000)
    np.testing.assert_allclose(np.mean(x, 0), np.mean(data, 0), atol=0.08)
    np.testing.assert_allclose(np.std(x, 0), np.std(data, 0), rtol=0.05)


def test_loss_at_the_true_field_is_the_minimum():
    x0, _ = draw_data(jax.random.key(3), 200_000)
    noise = jax.random.normal(jax.random.key(4), x0.shape, x0.dtype)
    t = flow.sample_time(jax.random.key(5), x0.shape[0], "uniform")
    x_t = flow.interpolant(x0, noise, t)
    v_star = true_velocity(x_t, t)
    at_minimum = float(jnp.mean(flow.loss(v_star, x0, noise)))
    assert at_minimum > 0.5  # the target is noisy: the irreducible part is large
    # Any other field pays exactly the mean squared distance to the true one (the cross term
    # vanishes): checked for a constant offset, a scaling and a field of x and t.
    for delta in (jnp.full_like(v_star, 0.1), 0.05 * v_star, 0.2 * jnp.sin(3 * x_t) * t[:, None]):
        extra = float(jnp.mean(flow.loss(v_star + delta, x0, noise))) - at_minimum
        expected = float(jnp.mean(jnp.mean(delta**2, -1)))
        assert extra > 0 and abs(extra - expected) < 0.1 * expected + 2e-4, (extra, expected)
    # The gradient of the loss in a constant offset vanishes at the true field.
    grad = jax.grad(lambda c: jnp.mean(flow.loss(v_star + c, x0, noise)))(jnp.zeros(2))
    assert float(jnp.max(jnp.abs(grad))) < 0.01


def test_inversion_round_trip_and_img2img_ends():
    data, _ = draw_data(jax.random.key(6), 64)
    noise = flow.invert(true_velocity, data, steps=200, solver="heun")
    back = flow.sample(true_velocity, noise, steps=200, solver="heun")
    np.testing.assert_allclose(back, data, atol=1e-4)
    # Inverting part of the way and integrating back also returns the input.
    mid = flow.invert(true_velocity, data, steps=100, solver="heun", t_end=0.5)
    np.testing.assert_allclose(flow.integrate(true_velocity, mid, flow.time_grid(100, t_start=0.5), "heun"),
                               data, atol=1e-4)
    fresh = jax.random.normal(jax.random.key(7), data.shape, data.dtype)
    # strength 1 ignores the input: it is sampling from that noise.
    np.testing.assert_allclose(flow.img2img(true_velocity, data, fresh, 1.0, 20),
                               flow.sample(true_velocity, fresh, 20), atol=1e-12)
    small = flow.img2img(true_velocity, data, fresh, 0.05, 20)
    assert float(jnp.mean(jnp.abs(small - data))) < 0.1


def test_inpaint_keeps_the_known_part_exactly():
    data, _ = draw_data(jax.random.key(8), 32)
    mask = np.array([True, False])  # regenerate the first coordinate, keep the second
    noise = jax.random.normal(jax.random.key(9), data.shape, data.dtype)
    out = flow.inpaint(true_velocity, data, mask, noise, steps=20)
    np.testing.assert_array_equal(out[:, 1], data[:, 1])
    assert not np.allclose(out[:, 0], data[:, 0])


def test_time_sampling_and_shift():
    t = flow.sample_time(jax.random.key(10), 100_000, "logit_normal", mean=0.5, std=0.8)
    logits = np.log(t / (1 - t))
    assert 0 < float(t.min()) and float(t.max()) < 1
    np.testing.assert_allclose([logits.mean(), logits.std()], [0.5, 0.8], atol=0.02)
    u = np.linspace(0, 1, 11)
    np.testing.assert_allclose(flow.shift_time(u, 1.0), u)
    shifted = flow.shift_time(u, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and np.all(np.diff(shifted) > 0) and np.all(shifted >= u)
    grid = flow.time_grid(10, shift=3.0, t_start=0.6)
    assert grid.shape == (11,) and grid[0] == np.float32(0.6) and grid[-1] == 0 and np.all(np.diff(grid) < 0)


@pytest.mark.parametrize("call, match", [
    (lambda: flow.time_grid(0), "steps"),
    (lambda: flow.time_grid(4, t_start=0.0), "t_start"),
    (lambda: flow.shift_time(0.5, 0.0), "shift"),
    (lambda: flow.sample_time(jax.random.key(0), 4, "beta"), "time sampling"),
    (lambda: flow.sample(true_velocity, jnp.zeros((2, 2)), 4, solver="rk4"), "solver"),
    (lambda: flow.img2img(true_velocity, jnp.zeros((2, 2)), jnp.zeros((2, 2)), 0.0, 4), "strength"),
])
def test_bad_arguments_name_themselves(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_one_trace_per_sampler():
    traces = []

    def velocity(x, t):
        traces.append(1)
        return -x

    jax.jit(lambda x: flow.sample(velocity, x, 30, "heun"))(jnp.ones((2, 2)))
    assert len(traces) == 2  # Heun's two calls, traced once inside the scan
