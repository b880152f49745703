"""Flow matching: the rectified-flow (linear) interpolant, its training target, and ODE samplers.

Time runs from data to noise, like the diffusion schedules (t = 0 is the least noisy):

    x_t = (1 - t) * x0 + t * noise,        t in [0, 1],

and a model learns the velocity `dx_t/dt = noise - x0` by regression (Lipman et al. 2023; Liu et
al. 2023). The minimiser of that regression is the conditional mean E[noise - x0 | x_t], the
velocity field of the probability-flow ODE whose solution from t = 1 (pure noise) to t = 0 draws
from the data distribution. Sampling integrates that ODE; inversion integrates it the other way.

A velocity function is any `velocity(x, t) -> v` with `x` `[B, ...]` and `t` float32 `[B]` (all
rows share one time). A caller wraps its model, classifier-free guidance included, into one.
Step counts and solver names are static; every loop over steps is a `lax.scan` with the velocity
traced once (twice for Heun's two calls, which share one program). Math is float32 (float64
when the input is, in x64 mode).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Velocity = Callable[[jax.Array, jax.Array], jax.Array]
SOLVERS = ("euler", "heun")
TIME_SAMPLING = ("logit_normal", "uniform")


def interpolant(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t on the straight line from `x0` (t = 0) to `noise` (t = 1); `t` is `[B]`."""
    t = t.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(jnp.promote_types(x0.dtype, jnp.float32))
    return (1.0 - t) * x0 + t * noise


def target_velocity(x0: jax.Array, noise: jax.Array) -> jax.Array:
    """What the model regresses on: d x_t / dt along the line."""
    return noise - x0


def estimates(x_t: jax.Array, t: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x0_hat, noise_hat) implied by a velocity at (x_t, t): the ends of the line through x_t."""
    t = t.reshape((-1,) + (1,) * (x_t.ndim - 1)).astype(jnp.float32)
    return x_t - t * v, x_t + (1.0 - t) * v


def loss(v_pred: jax.Array, x0: jax.Array, noise: jax.Array) -> jax.Array:
    """Per-example mean squared error of the velocity, `[B]` float32."""
    err = jnp.square(v_pred.astype(jnp.float32) - target_velocity(x0, noise).astype(jnp.float32))
    return jnp.mean(err.reshape(err.shape[0], -1), axis=1)


def shift_time(t, shift: float):
    """SD3's resolution shift: t -> shift t / (1 + (shift - 1) t). shift > 1 spends more of the
    schedule at high noise; 1 leaves t unchanged. Keeps 0 and 1 fixed and is increasing."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_time(key: jax.Array, batch: int, kind: str = "logit_normal", mean: float = 0.0,
                std: float = 1.0, shift: float = 1.0) -> jax.Array:
    """Training times `[batch]` float32 in (0, 1).

    "logit_normal" (SD3, Esser et al. 2024): sigmoid of a normal with `mean` and `std`, which
    puts most training where the velocity is hardest to predict, around t = 0.5. "uniform": U(0, 1).
    `shift` then moves them as `shift_time` does."""
    if kind == "logit_normal":
        t = jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch,), jnp.float32))
    elif kind == "uniform":
        t = jax.random.uniform(key, (batch,), jnp.float32)
    else:
        raise ValueError(f"time sampling must be one of {TIME_SAMPLING}, got {kind!r}")
    return shift_time(t, shift) if shift != 1.0 else t


def time_grid(steps: int, shift: float = 1.0, t_start: float = 1.0) -> np.ndarray:
    """`steps + 1` float32 times from `t_start` down to 0, evenly spaced before the shift."""
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not 0.0 < t_start <= 1.0:
        raise ValueError(f"t_start must be in (0, 1], got {t_start}")
    grid = shift_time(np.linspace(1.0, 0.0, steps + 1), shift) * t_start
    return grid.astype(np.float32)


def _call(velocity: Velocity, x: jax.Array, t: jax.Array) -> jax.Array:
    return velocity(x, jnp.full((x.shape[0],), t, t.dtype)).astype(x.dtype)


def _step(velocity: Velocity, solver: str, x, t, t_next):
    dt = t_next - t
    v = _call(velocity, x, t)
    if solver == "euler":
        return x + dt * v
    # Heun: Euler's guess, then the mean of the slopes at both ends (second order).
    guess = x + dt * v
    return x + dt * 0.5 * (v + _call(velocity, guess, t_next))


def integrate(velocity: Velocity, x: jax.Array, grid, solver: str = "euler",
              blend: Callable[[jax.Array, jax.Array], jax.Array] | None = None) -> jax.Array:
    """Solves dx/dt = velocity(x, t) along `grid` (decreasing: sampling; increasing: inversion).
    `blend(x, t)`, when given, is applied after every step (inpainting's re-imposed known part)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    grid = jnp.asarray(grid, dtype)
    x = x.astype(dtype)

    def body(x, ts):
        x = _step(velocity, solver, x, ts[0], ts[1])
        return (x if blend is None else blend(x, ts[1]).astype(dtype)), None

    x, _ = jax.lax.scan(body, x, jnp.stack([grid[:-1], grid[1:]], axis=1))
    return x


def sample(velocity: Velocity, noise: jax.Array, steps: int, solver: str = "euler",
           shift: float = 1.0) -> jax.Array:
    """Pure noise at t = 1 -> a sample at t = 0."""
    return integrate(velocity, noise, time_grid(steps, shift), solver)


def invert(velocity: Velocity, x0: jax.Array, steps: int, solver: str = "euler", shift: float = 1.0,
           t_end: float = 1.0) -> jax.Array:
    """A clean input at t = 0 -> its point at `t_end` on the ODE's path (the noise that samples it
    back, for t_end = 1). Deterministic: `integrate` from `t_end` along the same grid returns it."""
    return integrate(velocity, x0, time_grid(steps, shift, t_end)[::-1], solver)


def img2img(velocity: Velocity, x0: jax.Array, noise: jax.Array, strength: float, steps: int,
            solver: str = "euler", shift: float = 1.0) -> jax.Array:
    """Starts from the interpolant of `x0` at t = `strength` and integrates back to t = 0:
    strength 1 ignores `x0`, small strengths change it little."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    start = interpolant(x0, noise, jnp.full((x0.shape[0],), strength, jnp.float32))
    return integrate(velocity, start, time_grid(steps, shift, strength), solver)


def inpaint(velocity: Velocity, x0: jax.Array, mask: jax.Array, noise: jax.Array, steps: int,
            solver: str = "euler", shift: float = 1.0) -> jax.Array:
    """Regenerates where `mask` is True (broadcast against `x0`) and keeps the rest: after each
    step the known part is reset to its own interpolant at the new time (latent blending), so
    the generated part is integrated alongside the known one at the same noise level."""
    mask = jnp.asarray(mask, bool)

    def blend(x, t):
        known = interpolant(x0, noise, jnp.full((x0.shape[0],), t, t.dtype))
        return jnp.where(mask, x, known)

    return integrate(velocity, noise, time_grid(steps, shift), solver, blend=blend)
