import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.sampling import schedules
from mmjax.sampling.schedules import (
    PREDICTIONS,
    alpha_sigma,
    loss_weights,
    make_schedule,
    model_target,
    predict_x0_eps,
    q_sample,
    snr,
)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_alphas_cumprod_decrease_inside_unit_interval(kind):
    abar = np.asarray(make_schedule(kind, 1000).alphas_cumprod)
    assert abar.dtype == np.float32 and abar.shape == (1000,)
    assert np.all(np.diff(abar) < 0)
    assert np.all((abar > 0) & (abar < 1))


def test_linear_schedule_endpoints():
    abar = np.asarray(make_schedule("linear", 1000).alphas_cumprod, np.float64)
    betas = 1 - abar[1:] / abar[:-1]
    np.testing.assert_allclose(abar[0], 1 - 1e-4, rtol=1e-7)
    np.testing.assert_allclose(betas[0], 1e-4 + 0.0199 / 999, rtol=5e-3)  # float32 abar
    np.testing.assert_allclose(betas[-1], 0.02, rtol=1e-4)
    np.testing.assert_allclose(abar[-1], np.prod(1 - np.linspace(1e-4, 0.02, 1000)), rtol=1e-5)


def test_cosine_schedule_follows_squared_cosine():
    abar = np.asarray(make_schedule("cosine", 1000).alphas_cumprod, np.float64)
    f = lambda t: np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    assert abar[0] > 0.9999
    np.testing.assert_allclose(abar[499], f(500) / f(0), rtol=1e-5)
    # The last beta would be 1 without the clip at 0.999.
    np.testing.assert_allclose(abar[-1] / abar[-2], 1 - 0.999, rtol=1e-3)


def test_alpha_sigma_and_snr():
    schedule = make_schedule("cosine", 100)
    t = jnp.array([0, 50, 99], jnp.int32)
    alpha, sigma = alpha_sigma(schedule, t)
    assert alpha.shape == sigma.shape == (3,)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-6)
    np.testing.assert_allclose(snr(schedule, t), alpha**2 / sigma**2, rtol=1e-4)


def test_q_sample_moments_match_forward_process():
    schedule = make_schedule("linear", 1000)
    x0 = jnp.array([[-1.0, 0.0], [0.5, 1.0]])  # [2, 2]: broadcast over trailing axes
    draws, t = 20000, 300
    noise = jax.random.normal(jax.random.key(0), (draws, 2, 2))
    x_t = q_sample(schedule, jnp.broadcast_to(x0, noise.shape), jnp.full((draws,), t), noise)
    alpha, sigma = (float(v[0]) for v in alpha_sigma(schedule, jnp.array([t])))
    # Standard errors: sigma / sqrt(20000) ~ 0.005 for the mean, ~1% for the variance.
    np.testing.assert_allclose(x_t.mean(0), alpha * x0, atol=0.03)
    np.testing.assert_allclose(x_t.var(0), np.full((2, 2), sigma**2), rtol=0.05)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_model_target_round_trips_through_predict_x0_eps(prediction):
    schedule = make_schedule("cosine", 1000)
    k0, k1 = jax.random.split(jax.random.key(1))
    x0 = jax.random.uniform(k0, (5, 4, 4, 3), minval=-1, maxval=1)
    noise = jax.random.normal(k1, x0.shape)
    # Away from t = T-1 where alpha ~ 1e-4 makes eps -> x0 ill-conditioned in float32.
    t = jnp.array([0, 10, 300, 700, 950], jnp.int32)
    x_t = q_sample(schedule, x0, t, noise)
    target = model_target(prediction, x0, noise, schedule, t)
    x0_hat, eps_hat = predict_x0_eps(prediction, target, x_t, schedule, t)
    np.testing.assert_allclose(x0_hat, x0, atol=2e-3)
    np.testing.assert_allclose(eps_hat, noise, atol=2e-3)


def test_v_target_formula():
    schedule = make_schedule("linear", 1000)
    x0, noise, t = jnp.full((1, 3), 0.5), jnp.full((1, 3), -2.0), jnp.array([400])
    alpha, sigma = (float(v[0]) for v in alpha_sigma(schedule, t))
    np.testing.assert_allclose(
        model_target("v", x0, noise, schedule, t), alpha * -2.0 - sigma * 0.5, rtol=1e-6
    )


def test_min_snr_weights_match_hand_computation():
    schedule = make_schedule("linear", 1000)
    abar = np.asarray(schedule.alphas_cumprod, np.float64)
    t = np.array([0, 200, 999], np.int32)
    ratio = abar[t] / (1 - abar[t])
    assert ratio[0] > 5 > ratio[2]  # both sides of gamma
    clipped = np.minimum(ratio, 5.0)
    expected = {"eps": clipped / ratio, "v": clipped / (ratio + 1), "x0": clipped}
    for prediction, want in expected.items():
        got = loss_weights("min_snr", prediction, schedule, jnp.asarray(t), gamma=5.0)
        np.testing.assert_allclose(got, want, rtol=1e-4)
    np.testing.assert_array_equal(loss_weights("uniform", "v", schedule, jnp.asarray(t)), 1.0)
    # Spot values: eps at t=0 is 5 / snr_0; x0 at t=T-1 is snr itself.
    # rtol: abar_0 = 0.9999 in float32 leaves 1 - abar_0 with a relative error of ~1e-4.
    np.testing.assert_allclose(expected["eps"][0], 5 * 1e-4 / (1 - 1e-4), rtol=1e-3)


def test_schedule_is_a_pytree_under_jit():
    schedule = make_schedule("cosine", 64)
    fn = jax.jit(lambda s, t: (snr(s, t), s.num_timesteps))
    ratio, num = fn(schedule, jnp.array([3]))
    assert num == 64 and ratio.shape == (1,)


def test_bad_names_raise_value_error_naming_them():
    schedule = make_schedule("linear", 10)
    x, t = jnp.zeros((1, 2)), jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match="quadratic.*linear"):
        make_schedule("quadratic")
    with pytest.raises(ValueError, match="score.*eps"):
        model_target("score", x, x, schedule, t)
    with pytest.raises(ValueError, match="score.*eps"):
        predict_x0_eps("score", x, x, schedule, t)
    with pytest.raises(ValueError, match="p2.*min_snr"):
        loss_weights("p2", "eps", schedule, t)
    with pytest.raises(ValueError, match="score"):
        loss_weights("uniform", "score", schedule, t)
    assert schedules.WEIGHTINGS == ("uniform", "min_snr")
