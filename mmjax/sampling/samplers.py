"""Jit-compatible diffusion samplers and editing primitives, independent of any model.

A denoiser is any function `denoise(x_t, t) -> (x0_hat, eps_hat)` with `x_t` `[B, ...]` and
`t` int32 `[B]` (all rows share one timestep). A caller wraps its model, classifier-free
guidance included, into one; `schedules.predict_x0_eps` turns a raw model output into the pair.

- `sample`: `ddpm`, `ddim`, `dpmpp_2m` and `euler` from a noisy `x` down to a clean estimate.
- `ddim_invert`: deterministic DDIM backwards, clean image -> noise.
- `img2img`: SDEdit, noise an image part of the way and sample back.
- `inpaint`: RePaint, regenerate a masked region in harmony with the rest.

Timesteps follow `schedules`: t = 0 is the least noisy. Step counts, sampler names and other
keyword options are static; every loop over steps is a `lax.scan` or `fori_loop` with the
denoiser traced once, so a whole sampler compiles to one program. Sampling math is float32.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.sampling.schedules import Schedule, q_sample

Denoiser = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "euler")


def timesteps(schedule: Schedule, steps: int, t_start: int | None = None) -> np.ndarray:
    """`steps` distinct int32 timesteps, evenly spaced from `t_start` (default T-1) down to 0."""
    num_timesteps = schedule.num_timesteps
    t_start = num_timesteps - 1 if t_start is None else int(t_start)
    if not 0 <= t_start < num_timesteps:
        raise ValueError(f"t_start must be in [0, {num_timesteps - 1}], got {t_start}")
    if not 1 <= steps <= t_start + 1:
        raise ValueError(f"steps must be in [1, {t_start + 1}] for t_start={t_start}, got {steps}")
    if steps == 1:
        return np.array([t_start], np.int32)
    # The spacing is >= 1, so rounding keeps the timesteps distinct.
    return np.round(np.linspace(t_start, 0, steps)).astype(np.int32)


def _abar_path(schedule: Schedule, ts: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """abar at each step's timestep and at the level it steps to; the last step goes to clean."""
    abar = schedule.alphas_cumprod.astype(jnp.float32)[ts]
    return abar, jnp.concatenate([abar[1:], jnp.ones((1,), jnp.float32)])


def _call(denoise: Denoiser, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    x0, eps = denoise(x, jnp.full((x.shape[0],), t, jnp.int32))
    return x0.astype(jnp.float32), eps.astype(jnp.float32)


# One step from level abar_t to the less noisy abar_s (1 for the final, clean level):
# step(x, x0_hat, eps_hat, abar_t, abar_s, key, state, eta) -> (x_next, state).


def _ddpm_step(x, x0, eps, abar_t, abar_s, key, state, eta):
    # The DDPM posterior q(x_s | x_t, x0_hat) of a strided step, whose one-step alpha is
    # abar_t / abar_s (DDIM's eta = 1, written in DDPM's form).
    alpha_ts = abar_t / abar_s
    beta_ts = 1.0 - alpha_ts
    mean = (jnp.sqrt(abar_s) * beta_ts * x0 + jnp.sqrt(alpha_ts) * (1.0 - abar_s) * x) / (
        1.0 - abar_t
    )
    std = jnp.sqrt(beta_ts * (1.0 - abar_s) / (1.0 - abar_t))
    return mean + std * jax.random.normal(key, x.shape, jnp.float32), state


def _ddim_step(x, x0, eps, abar_t, abar_s, key, state, eta):
    # Song et al. (2021) eq. 12; eta interpolates deterministic (0) and DDPM-like (1) steps.
    x_next = jnp.sqrt(abar_s) * x0
    if eta == 0.0:
        return x_next + jnp.sqrt(1.0 - abar_s) * eps, state
    var = eta**2 * (1.0 - abar_s) / (1.0 - abar_t) * (1.0 - abar_t / abar_s)
    x_next = x_next + jnp.sqrt(jnp.maximum(1.0 - abar_s - var, 0.0)) * eps
    return x_next + jnp.sqrt(var) * jax.random.normal(key, x.shape, jnp.float32), state


def _log_snr(abar):
    # lambda = log(alpha / sigma); +inf at the clean level abar = 1.
    return 0.5 * (jnp.log(abar) - jnp.log1p(-abar))


def _dpmpp_2m_step(x, x0, eps, abar_t, abar_s, key, state, eta):
    # DPM-Solver++(2M), Lu et al. (2022) Algorithm 2. The first step (no history, h_prev = 0)
    # and the step to the clean level (h = inf) are first order, as in k-diffusion.
    x0_prev, h_prev = state
    h = _log_snr(abar_s) - _log_snr(abar_t)
    second_order = (h_prev > 0) & (abar_s < 1.0)
    half_inv_r = jnp.where(second_order, h / (2.0 * h_prev), 0.0)  # 1 / (2r), r = h_prev / h
    x0_mix = x0 + half_inv_r * (x0 - x0_prev)
    sigma_ratio = jnp.sqrt((1.0 - abar_s) / (1.0 - abar_t))
    return sigma_ratio * x - jnp.sqrt(abar_s) * jnp.expm1(-h) * x0_mix, (x0, h)


def _euler_step(x, x0, eps, abar_t, abar_s, key, state, eta):
    # Karras et al. (2022) Euler on the variance-exploding ODE dx/dsigma = (x - x0_hat) / sigma
    # with x_ve = x / alpha and sigma = sqrt((1 - abar) / abar). At the schedule's own discrete
    # sigmas this is the same update as deterministic DDIM.
    sigma_t = jnp.sqrt((1.0 - abar_t) / abar_t)
    sigma_s = jnp.sqrt((1.0 - abar_s) / abar_s)
    x_ve = x / jnp.sqrt(abar_t)
    slope = (x_ve - x0) / sigma_t
    return jnp.sqrt(abar_s) * (x_ve + (sigma_s - sigma_t) * slope), state


def _no_state(x):
    return ()


def _dpmpp_2m_state(x):
    return jnp.zeros_like(x), jnp.zeros((), jnp.float32)


# name -> (initial sampler state for a given x, step function)
_SAMPLER_STEPS = {
    "ddpm": (_no_state, _ddpm_step),
    "ddim": (_no_state, _ddim_step),
    "dpmpp_2m": (_dpmpp_2m_state, _dpmpp_2m_step),
    "euler": (_no_state, _euler_step),
}


def run_path(denoise_at, x: jax.Array, rng: jax.Array, t_model, abar_t, abar_s, *, sampler: str = "ddim",
             eta: float = 0.0, after=None) -> tuple[jax.Array, jax.Array]:
    """Steps `x` along an explicit path: step i calls `denoise_at(x, t_model[i], abar_t[i])` (the
    model's timestep, which may be fractional, and the noise level there) and moves from level
    `abar_t[i]` to `abar_s[i]`. Returns `(x after the last step, the last x0 prediction)`: equal
    when the path ends at the clean level 1. `after(x, abar_s) -> x`, when given, edits the
    state after every step (inpainting puts the known region back). For checkpoints whose
    schedulers walk their own timesteps (`interop.scheduler`); `sample` is this on the
    schedule's evenly spaced path."""
    if sampler not in _SAMPLER_STEPS:
        raise ValueError(f"unknown sampler {sampler!r}; known: {SAMPLERS}")
    init_state, step = _SAMPLER_STEPS[sampler]
    x = x.astype(jnp.float32)

    def body(carry, inputs):
        x, _, state = carry
        t, a_t, a_s, key = inputs
        x0, eps = denoise_at(x, t, a_t)
        x0, eps = x0.astype(jnp.float32), eps.astype(jnp.float32)
        x, state = step(x, x0, eps, a_t, a_s, key, state, eta)
        if after is not None:
            x = after(x, a_s)
        return (x, x0, state), None

    abar_t, abar_s = jnp.asarray(abar_t, jnp.float32), jnp.asarray(abar_s, jnp.float32)
    inputs = (jnp.asarray(t_model), abar_t, abar_s, jax.random.split(rng, abar_t.shape[0]))
    (x, x0, _), _ = jax.lax.scan(body, (x, jnp.zeros_like(x), init_state(x)), inputs)
    return x, x0


def sample(
    denoise: Denoiser,
    schedule: Schedule,
    x: jax.Array,
    rng: jax.Array,
    *,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    t_start: int | None = None,
) -> jax.Array:
    """Runs `steps` denoiser calls from `x` at noise level `t_start` (default T-1: pure noise).

    Returns the last call's x0 prediction, made at t = 0. `eta` is used by `ddim` only.
    """
    if sampler not in _SAMPLER_STEPS:
        raise ValueError(f"unknown sampler {sampler!r}; known: {SAMPLERS}")
    ts = timesteps(schedule, steps, t_start)
    abar_t, abar_s = _abar_path(schedule, ts)
    return run_path(lambda x, t, _: _call(denoise, x, t), x, rng, ts, abar_t, abar_s, sampler=sampler, eta=eta)[1]


def invert_path(denoise_at, x0: jax.Array, t_model, abar) -> jax.Array:
    """Deterministic DDIM upwards from clean `x0` through the levels `abar` (rising noise) at
    the model timesteps `t_model`. Each step takes eps from the point it leaves; the clean start
    has no timestep, so the first one stands in for it."""
    abar_to = jnp.asarray(abar, jnp.float32)
    abar_from = jnp.concatenate([jnp.ones((1,), jnp.float32), abar_to[:-1]])
    t_model = jnp.asarray(t_model)
    t_eval = jnp.concatenate([t_model[:1], t_model[:-1]])

    def body(x, inputs):
        t, a_from, a_to = inputs
        _, eps = denoise_at(x, t, a_from)
        eps = eps.astype(jnp.float32)
        x0_hat = (x - jnp.sqrt(1.0 - a_from) * eps) / jnp.sqrt(a_from)
        return jnp.sqrt(a_to) * x0_hat + jnp.sqrt(1.0 - a_to) * eps, None

    x, _ = jax.lax.scan(body, x0.astype(jnp.float32), (jnp.asarray(t_eval), abar_from, abar_to))
    return x


def ddim_invert(
    denoise: Denoiser,
    schedule: Schedule,
    x0: jax.Array,
    *,
    steps: int = 50,
    t_end: int | None = None,
) -> jax.Array:
    """Deterministic DDIM from clean `x0` up to noise level `t_end` (default T-1).

    Walks `timesteps(schedule, steps, t_end)` in reverse, so `sample(..., sampler="ddim",
    steps=steps, t_start=t_end)` approximately undoes it. Each step takes eps from the point it
    leaves; the clean start has no timestep, so t = 0 stands in for it. Like DDIM itself this
    is first order: the round trip's error shrinks as 1 / steps.
    """
    ts = timesteps(schedule, steps, t_end)[::-1]
    abar = schedule.alphas_cumprod.astype(jnp.float32)[ts]
    return invert_path(lambda x, t, _: _call(denoise, x, t), x0, ts, abar)


def img2img(
    denoise: Denoiser,
    schedule: Schedule,
    x0: jax.Array,
    rng: jax.Array,
    *,
    strength: float,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
) -> jax.Array:
    """SDEdit (Meng et al. 2022): noise `x0` to t = round(strength * (T-1)) and sample back.

    `strength` in (0, 1]: 1 ignores the input; small values change little. Uses
    max(1, round(strength * steps)) denoiser calls.
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    t_start = round(strength * (schedule.num_timesteps - 1))
    num_steps = min(max(1, round(strength * steps)), t_start + 1)
    noise_key, sample_key = jax.random.split(rng)
    x0 = x0.astype(jnp.float32)
    t = jnp.full((x0.shape[0],), t_start, jnp.int32)
    x = q_sample(schedule, x0, t, jax.random.normal(noise_key, x0.shape, jnp.float32))
    return sample(
        denoise, schedule, x, sample_key, sampler=sampler, steps=num_steps, eta=eta, t_start=t_start
    )


def inpaint(
    denoise: Denoiser,
    schedule: Schedule,
    x_known: jax.Array,
    mask: jax.Array,
    rng: jax.Array,
    *,
    steps: int = 50,
    resample: int = 4,
    jump: int = 1,
) -> jax.Array:
    """RePaint (Lugmayr et al. 2022): regenerates where `mask` is 1, keeps `x_known` where 0.

    DDPM steps along `timesteps(schedule, steps)`; after each one the kept region is replaced
    by `x_known` noised to the new level. Every `jump` steps (steps % jump == 0) the result is
    noised back up `jump` steps and denoised again, `resample` passes in all (RePaint's U;
    1 means no resampling), so `steps * resample` denoiser calls. The final composite equals
    `x_known` exactly where `mask` is 0.
    """
    if resample < 1 or jump < 1 or steps % jump:
        raise ValueError(
            "need resample >= 1, jump >= 1 and steps % jump == 0; "
            f"got {resample=}, {jump=}, {steps=}"
        )
    ts = timesteps(schedule, steps)
    abar_t, abar_s = _abar_path(schedule, ts)
    x_known = x_known.astype(jnp.float32)
    mask = jnp.broadcast_to(mask.astype(jnp.float32), x_known.shape)

    def composite(x, abar, key):
        noise = jax.random.normal(key, x.shape, jnp.float32)
        known = jnp.sqrt(abar) * x_known + jnp.sqrt(1.0 - abar) * noise
        return mask * x + (1.0 - mask) * known

    def descend(x, inputs):
        t, a_t, a_s, key = inputs
        step_key, known_key = jax.random.split(key)
        x0, eps = _call(denoise, x, t)
        x, _ = _ddpm_step(x, x0, eps, a_t, a_s, step_key, (), 0.0)
        # At the clean level (a_s = 1) the DDPM step returns x0_hat and `known` is x_known.
        return composite(x, a_s, known_key), None

    def block(x, inputs):
        ts_b, a_t_b, a_s_b, key = inputs
        # Noising from the block's end level back to its start level is one Gaussian step.
        ratio = a_t_b[0] / a_s_b[-1]

        def one_pass(i, x):
            renoise_key, descend_key = jax.random.split(jax.random.fold_in(key, i))
            noise = jax.random.normal(renoise_key, x.shape, jnp.float32)
            x = jnp.where(i > 0, jnp.sqrt(ratio) * x + jnp.sqrt(1.0 - ratio) * noise, x)
            keys = jax.random.split(descend_key, jump)
            return jax.lax.scan(descend, x, (ts_b, a_t_b, a_s_b, keys))[0]

        return jax.lax.fori_loop(0, resample, one_pass, x), None

    init_key, start_key, loop_key = jax.random.split(rng, 3)
    x = composite(jax.random.normal(start_key, x_known.shape, jnp.float32), abar_t[0], init_key)
    blocks = steps // jump
    inputs = (
        jnp.asarray(ts).reshape(blocks, jump),
        abar_t.reshape(blocks, jump),
        abar_s.reshape(blocks, jump),
        jax.random.split(loop_key, blocks),
    )
    x, _ = jax.lax.scan(block, x, inputs)
    return x
