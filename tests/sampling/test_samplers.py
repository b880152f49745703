"""Samplers driven by the exact denoiser for Gaussian data, so every right answer is known.

For x0 ~ N(mu, s^2) elementwise, E[x0 | x_t] is closed form, and with it every deterministic
sampler is a linear map of the starting noise. Their few-step errors are real discretisation
error (DDIM under-disperses by prod cos(angle step), DPM-Solver++(2M) overshoots on the big
last log-SNR step of a uniform t grid), so distribution checks use enough steps for ~1%
accuracy, and few-step behaviour is checked against closed forms and a reference transcription.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.sampling import samplers
from mmjax.sampling.samplers import ddim_invert, img2img, inpaint, sample, timesteps
from mmjax.sampling.schedules import alpha_sigma, make_schedule

MU, S = 0.5, 0.3
SCHEDULE = make_schedule("cosine", 1000)


def gaussian_denoiser(schedule, mu=MU, s=S):
    """The posterior mean for elementwise x0 ~ N(mu, s^2): the best possible denoiser."""

    def denoise(x_t, t):
        alpha, sigma = alpha_sigma(schedule, t)
        a, c = alpha[:, None], sigma[:, None]
        x0 = mu + a * s**2 * (x_t - a * mu) / (a**2 * s**2 + c**2)
        return x0, (x_t - a * x0) / c

    return denoise


def constant_row_denoiser(schedule, mu=MU, s=S):
    """The posterior mean for rows x0 = mu + s * z * ones, z ~ N(0, 1): pixels must agree."""

    def denoise(x_t, t):
        alpha, sigma = alpha_sigma(schedule, t)
        a, c = alpha[:, None], sigma[:, None]
        dim = x_t.shape[1]
        z = a * s * jnp.sum(x_t - a * mu, axis=1, keepdims=True) / (a**2 * s**2 * dim + c**2)
        x0 = jnp.broadcast_to(mu + s * z, x_t.shape)
        return x0, (x_t - a * x0) / c

    return denoise


DENOISE = gaussian_denoiser(SCHEDULE)


def _noise(seed, shape=(4096, 8)):
    return jax.random.normal(jax.random.key(seed), shape)


def _abar_path(ts):
    abar = np.asarray(SCHEDULE.alphas_cumprod, np.float64)
    return np.append(abar[ts], 1.0)


@pytest.mark.parametrize(
    "sampler, eta, steps",
    [("ddpm", 0.0, 500), ("ddim", 0.0, 250), ("ddim", 1.0, 500), ("dpmpp_2m", 0.0, 100),
     ("euler", 0.0, 250)],
)
def test_sample_reaches_the_data_distribution(sampler, eta, steps):
    run = functools.partial(sample, DENOISE, SCHEDULE, sampler=sampler, steps=steps, eta=eta)
    x0 = jax.jit(run)(_noise(0), jax.random.key(1))
    assert x0.shape == (4096, 8) and x0.dtype == jnp.float32
    # 32768 draws: standard errors 0.002 (mean) and 0.0012 (std); discretisation error < 0.004.
    assert abs(float(x0.mean()) - MU) < 0.01
    assert abs(float(x0.std()) - S) < 0.012


def test_ddim_matches_its_closed_form_at_few_steps():
    # Each DDIM step scales x - alpha*mu by (a_s a_t s^2 + c_s c_t) / (a_t^2 s^2 + c_t^2).
    ts = timesteps(SCHEDULE, 20)
    abar = _abar_path(ts)
    a, c = np.sqrt(abar), np.sqrt(1 - abar)
    gain = np.prod((a[1:] * a[:-1] * S**2 + c[1:] * c[:-1]) / (a[:-1] ** 2 * S**2 + c[:-1] ** 2))
    x = _noise(0, (64, 8))
    out = sample(DENOISE, SCHEDULE, x, jax.random.key(0), sampler="ddim", steps=20)
    np.testing.assert_allclose(out, MU + gain * (np.asarray(x) - a[0] * MU), atol=1e-4)
    assert 0.85 < gain * np.sqrt(a[0] ** 2 * S**2 + c[0] ** 2) / S < 0.93  # 11% under-dispersed


def _kdiffusion_dpmpp_2m(x_ve, sigmas):
    """k_diffusion.sampling.sample_dpmpp_2m transcribed in float64, in VE space."""
    denoise_ve = lambda x, sigma: MU + S**2 * (x - MU) / (S**2 + sigma**2)  # noqa: E731
    t_fn = lambda sigma: -np.log(sigma)  # noqa: E731
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = denoise_ve(x_ve, sigmas[i])
        h = (np.inf if sigmas[i + 1] == 0 else t_fn(sigmas[i + 1])) - t_fn(sigmas[i])
        if old_denoised is None or sigmas[i + 1] == 0:
            x_ve = sigmas[i + 1] / sigmas[i] * x_ve - np.expm1(-h) * denoised
        else:
            r = (t_fn(sigmas[i]) - t_fn(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * old_denoised
            x_ve = sigmas[i + 1] / sigmas[i] * x_ve - np.expm1(-h) * denoised_d
        old_denoised = denoised
    return x_ve


def test_dpmpp_2m_matches_k_diffusion_reference():
    ts = timesteps(SCHEDULE, 10)
    abar = _abar_path(ts)
    sigmas = np.sqrt((1 - abar) / abar)
    x = _noise(0, (64, 8))
    want = _kdiffusion_dpmpp_2m(np.asarray(x, np.float64) / np.sqrt(abar[0]), sigmas)
    got = sample(DENOISE, SCHEDULE, x, jax.random.key(0), sampler="dpmpp_2m", steps=10)
    np.testing.assert_allclose(got, want, atol=1e-4)


def _gain_error(sampler, steps):
    """|output std / S - 1| of a deterministic sampler, free of sampling noise (it is linear)."""
    x = _noise(0, (8, 1))
    out = sample(DENOISE, SCHEDULE, x, jax.random.key(0), sampler=sampler, steps=steps)
    abar_start = float(SCHEDULE.alphas_cumprod[-1])
    gain = (out - MU) / (x - np.sqrt(abar_start) * MU)
    std_start = np.sqrt(abar_start * S**2 + 1 - abar_start)
    return abs(float(gain.mean()) * std_start / S - 1)


def test_convergence_orders():
    ddim = [_gain_error("ddim", n) for n in (50, 100)]
    dpmpp = [_gain_error("dpmpp_2m", n) for n in (50, 100)]
    assert 0.4 < ddim[1] / ddim[0] < 0.6  # first order
    assert dpmpp[1] / dpmpp[0] < 0.35  # second order: ~0.25
    assert dpmpp[1] < ddim[1] / 2


def test_ddpm_is_ddim_with_eta_one_and_euler_is_ddim_with_eta_zero():
    x, rng = _noise(0, (256, 8)), jax.random.key(3)
    run = functools.partial(sample, DENOISE, SCHEDULE, x, rng, steps=20)
    np.testing.assert_allclose(run(sampler="ddpm"), run(sampler="ddim", eta=1.0), atol=1e-4)
    np.testing.assert_allclose(run(sampler="euler"), run(sampler="ddim", eta=0.0), atol=1e-3)
    assert not np.allclose(run(sampler="ddpm"), run(sampler="ddim", eta=0.0), atol=1e-2)


def test_timesteps():
    for t_start in (0, 1, 7, 99, 999):
        for steps in range(1, t_start + 2):
            ts = timesteps(SCHEDULE, steps, t_start)
            assert ts.dtype == np.int32 and ts.shape == (steps,)
            assert ts[0] == t_start and (steps == 1 or ts[-1] == 0)
            assert np.all(np.diff(ts) < 0)
    np.testing.assert_array_equal(timesteps(SCHEDULE, 4, 9), [9, 6, 3, 0])
    assert timesteps(SCHEDULE, 50)[0] == 999
    with pytest.raises(ValueError, match="steps"):
        timesteps(SCHEDULE, 0)
    with pytest.raises(ValueError, match="steps"):
        timesteps(SCHEDULE, 11, t_start=9)
    with pytest.raises(ValueError, match="t_start"):
        timesteps(SCHEDULE, 5, t_start=1000)


def test_unknown_sampler_raises():
    with pytest.raises(ValueError, match="heun.*ddpm"):
        sample(DENOISE, SCHEDULE, _noise(0, (2, 8)), jax.random.key(0), sampler="heun")
    assert samplers.SAMPLERS == ("ddpm", "ddim", "dpmpp_2m", "euler")


@pytest.mark.parametrize("t_end, steps, tol", [(None, 500, 0.02), (300, 100, 0.03)])
def test_ddim_invert_then_sample_reconstructs(t_end, steps, tol):
    x0 = MU + S * _noise(5, (512, 8))
    latent = ddim_invert(DENOISE, SCHEDULE, x0, steps=steps, t_end=t_end)
    back = sample(DENOISE, SCHEDULE, latent, jax.random.key(0), steps=steps, t_start=t_end)
    # DDIM inversion is first order: the round trip loses ~5 / steps of x0 - mu.
    assert float(jnp.abs(back - x0).max()) < tol
    if t_end is None:
        assert abs(float(latent.mean())) < 0.05 and abs(float(latent.std()) - 1) < 0.05


def test_img2img():
    x0 = MU + S * _noise(6, (4096, 8))
    near = img2img(DENOISE, SCHEDULE, x0, jax.random.key(0), strength=0.02)
    assert float(jnp.abs(near - x0).mean()) < 0.05  # sigma at t=20 is ~0.045
    fresh = jax.jit(functools.partial(img2img, DENOISE, SCHEDULE, strength=1.0, steps=250))(
        x0, jax.random.key(1)
    )
    assert abs(float(fresh.mean()) - MU) < 0.01 and abs(float(fresh.std()) - S) < 0.012
    assert abs(np.corrcoef(np.ravel(fresh), np.ravel(x0))[0, 1]) < 0.05
    for strength in (0.0, 1.5):
        with pytest.raises(ValueError, match=str(strength)):
            img2img(DENOISE, SCHEDULE, x0, jax.random.key(0), strength=strength)


def test_inpaint_keeps_known_region_and_samples_the_rest():
    x_known = MU + S * _noise(7, (4096, 8))
    mask = jnp.zeros((1, 8)).at[:, 4:].set(1.0)  # broadcast over the batch
    run = jax.jit(functools.partial(inpaint, DENOISE, SCHEDULE, steps=250, resample=2))
    out = run(x_known, mask, jax.random.key(0))
    np.testing.assert_array_equal(out[:, :4], x_known[:, :4])
    generated = out[:, 4:]
    # DDPM steps under-disperse a little (std ~0.29 here) and resampling adds to it.
    assert abs(float(generated.mean()) - MU) < 0.01
    assert abs(float(generated.std()) - S) < 0.03


def test_inpaint_resampling_harmonises():
    # Rows are constant, so the generated half must copy the known half's value.
    schedule = make_schedule("cosine", 1000)
    denoise = constant_row_denoiser(schedule)
    x_known = jnp.broadcast_to(MU + S * _noise(8, (1024, 1)), (1024, 8))
    mask = jnp.zeros((8,)).at[4:].set(1.0)

    def error(resample, jump):
        out = inpaint(denoise, schedule, x_known, mask, jax.random.key(0), steps=50,
                      resample=resample, jump=jump)
        np.testing.assert_array_equal(out[:, :4], x_known[:, :4])
        return float(jnp.abs(out[:, 4:] - x_known[:, 4:]).mean())

    plain, resampled = error(1, 1), error(4, 1)
    assert resampled < 0.01 and resampled < plain / 3  # measured 0.002 vs 0.017
    assert error(4, 5) < plain  # RePaint's jumps also help
    with pytest.raises(ValueError, match="jump"):
        inpaint(denoise, schedule, x_known, mask, jax.random.key(0), steps=50, jump=3)


@pytest.mark.parametrize("entry", ["sample", "ddim_invert", "img2img", "inpaint"])
def test_jitted_entry_points_trace_the_denoiser_once(entry):
    traces = []

    def denoise(x_t, t):
        traces.append(None)
        return DENOISE(x_t, t)

    jit = lambda fn, **kw: jax.jit(functools.partial(fn, denoise, SCHEDULE, **kw))  # noqa: E731
    run = {
        "sample": jit(sample, sampler="dpmpp_2m", steps=8),
        "ddim_invert": jit(ddim_invert, steps=8),
        "img2img": jit(img2img, strength=0.5, sampler="ddpm", steps=8),
        "inpaint": jit(inpaint, steps=8, resample=2, jump=2),
    }[entry]

    def args(seed):
        x, rng = _noise(seed, (4, 8)), jax.random.key(seed)
        return {"ddim_invert": (x,), "inpaint": (x, jnp.ones((8,)), rng)}.get(entry, (x, rng))

    first = run(*args(0))
    assert len(traces) == 1
    second = run(*args(1))
    assert len(traces) == 1
    assert not np.allclose(first, second)
