"""Diffusion noise schedules and the algebra between x0, noise, x_t and what a model predicts.

Conventions: discrete timesteps t = 0..T-1 with t = 0 the least noisy;
x_t = alpha_t * x0 + sigma_t * noise with alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t).
Timesteps are int32 `[B]`; data is `[B, ...]` and per-example coefficients broadcast over the
trailing axes. Coefficients are float32 whatever the data dtype, because bfloat16 cannot
resolve 1 - abar_t near t = 0.
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np

PREDICTIONS = ("eps", "v", "x0")
WEIGHTINGS = ("uniform", "min_snr")


@flax.struct.dataclass
class Schedule:
    """`alphas_cumprod`: float32 `[T]`, abar_t for t = 0..T-1, decreasing in (0, 1)."""

    alphas_cumprod: jax.Array

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]


def _linear_betas(num_timesteps: int) -> np.ndarray:
    return np.linspace(1e-4, 0.02, num_timesteps, dtype=np.float64)


def _cosine_betas(num_timesteps: int, s: float = 0.008) -> np.ndarray:
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
    # Clipping keeps the last steps from being pure noise (beta = 1), as Nichol & Dhariwal do.
    return np.minimum(1 - f[1:] / f[:-1], 0.999)


_BETAS = {"linear": _linear_betas, "cosine": _cosine_betas}


def make_schedule(kind: str = "linear", num_timesteps: int = 1000) -> Schedule:
    """A DDPM `linear` (betas 1e-4..0.02) or Nichol & Dhariwal `cosine` schedule of T steps."""
    if kind not in _BETAS:
        raise ValueError(f"unknown schedule {kind!r}; known: {tuple(_BETAS)}")
    # The cumulative product runs in float64; only the result is stored in float32.
    alphas_cumprod = np.cumprod(1.0 - _BETAS[kind](num_timesteps))
    return Schedule(alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32))


def _expand(coef: jax.Array, like: jax.Array) -> jax.Array:
    """`[B]` -> `[B, 1, ..., 1]` so that it broadcasts against `like` `[B, ...]`."""
    return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim))


def alpha_sigma(schedule: Schedule, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(sqrt(abar_t), sqrt(1 - abar_t))`, each float32 `[B]`."""
    abar = schedule.alphas_cumprod[t].astype(jnp.float32)
    return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Draws x_t ~ q(x_t | x0) with the given standard-normal `noise`."""
    alpha, sigma = alpha_sigma(schedule, t)
    x_t = _expand(alpha, x0) * x0 + _expand(sigma, x0) * noise
    return x_t.astype(jnp.result_type(x0, noise))


def snr(schedule: Schedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio abar_t / (1 - abar_t), float32 `[B]`."""
    abar = schedule.alphas_cumprod[t].astype(jnp.float32)
    return abar / (1.0 - abar)


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; known: {PREDICTIONS}")


def model_target(
    prediction: str, x0: jax.Array, noise: jax.Array, schedule: Schedule, t: jax.Array
) -> jax.Array:
    """What a model predicting `prediction` should output for x_t = q_sample(x0, t, noise)."""
    _check_prediction(prediction)
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    alpha, sigma = alpha_sigma(schedule, t)
    return _expand(alpha, x0) * noise - _expand(sigma, x0) * x0


def predict_x0_eps(
    prediction: str, model_out: jax.Array, x_t: jax.Array, schedule: Schedule, t: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Inverts `model_target`: `(x0_hat, eps_hat)` from a model output at `(x_t, t)`."""
    _check_prediction(prediction)
    alpha, sigma = alpha_sigma(schedule, t)
    alpha, sigma = _expand(alpha, x_t), _expand(sigma, x_t)
    model_out = model_out.astype(jnp.float32)
    if prediction == "eps":
        return (x_t - sigma * model_out) / alpha, model_out
    if prediction == "x0":
        return model_out, (x_t - alpha * model_out) / sigma
    # v = alpha * eps - sigma * x0 and x_t = alpha * x0 + sigma * eps, with alpha^2 + sigma^2 = 1.
    return alpha * x_t - sigma * model_out, sigma * x_t + alpha * model_out


def loss_weights(
    weighting: str, prediction: str, schedule: Schedule, t: jax.Array, gamma: float = 5.0
) -> jax.Array:
    """Per-example loss weights `[B]` for a squared error on the `prediction` target.

    `min_snr` is Min-SNR-gamma (Hang et al. 2023): the x0-space weight min(snr, gamma), divided
    by the factor by which the chosen target's error scales the x0 error (snr for eps,
    snr + 1 for v).
    """
    _check_prediction(prediction)
    if weighting == "uniform":
        return jnp.ones(t.shape, jnp.float32)
    if weighting != "min_snr":
        raise ValueError(f"unknown loss weighting {weighting!r}; known: {WEIGHTINGS}")
    ratio = snr(schedule, t)
    clipped = jnp.minimum(ratio, gamma)
    return {"eps": clipped / ratio, "v": clipped / (ratio + 1.0), "x0": clipped}[prediction]
