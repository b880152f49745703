"""A diffusers scheduler config (`scheduler/scheduler_config.json`) as the project's sampling paths.

diffusers schedulers hold three things the project's samplers need explicitly: the noise levels
(`beta_schedule`, `beta_start`, `beta_end`, `num_train_timesteps`, or `trained_betas`), what the
model predicts (`prediction_type`), and which timesteps a run of N steps visits
(`timestep_spacing`, `steps_offset`) with where the last step lands (`set_alpha_to_one`).
`SchedulerSpec.path(sampler, steps)` turns them into the arrays the samplers step along: the
timestep the model is called at, the noise level there and the level the step goes to, exactly as
diffusers' DDIM and Euler schedulers walk them (tests/fixtures/sd_pipeline holds their
trajectories).

Fields that change the maths to something not built here (thresholding, Karras sigmas, zero-SNR
rescaling, ...) are refused unless they hold their neutral value; fields that only tune a
particular diffusers solver (`solver_order`, ...) are accepted and ignored, since the sampler is
chosen per call; any other field is an error that names it.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
SPACINGS = ("leading", "linspace", "trailing")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# Fields that must hold these values (anything else changes the maths in ways not built here).
NEUTRAL = {"thresholding": False, "rescale_betas_zero_snr": False, "use_karras_sigmas": False,
           "use_exponential_sigmas": False, "use_beta_sigmas": False, "interpolation_type": "linear",
           "timestep_type": "discrete", "sigma_min": None, "sigma_max": None, "shift": None,
           "use_dynamic_shifting": False, "variance_type": None}
# Fields read below.
READ = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
        "timestep_spacing", "steps_offset", "clip_sample", "clip_sample_range", "set_alpha_to_one"}
# Fields that only tune one diffusers solver, or record where the file came from.
IGNORED = {"_class_name", "_diffusers_version", "skip_prk_steps", "solver_order", "solver_type", "algorithm_type",
           "lower_order_final", "euler_at_final", "lambda_min_clipped", "final_sigmas_type", "sample_max_value",
           "dynamic_thresholding_ratio", "use_lu_lambdas", "use_flow_sigmas", "flow_shift", "predict_x0",
           "disable_corrector", "solver_p", "timestep_scaling", "original_inference_steps"}
# diffusers' defaults differ by scheduler class; a saved config normally states them all.
LINSPACE_BY_DEFAULT = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
                       "HeunDiscreteScheduler", "LMSDiscreteScheduler", "UniPCMultistepScheduler")
CLIPS_BY_DEFAULT = ("DDIMScheduler", "DDPMScheduler")
SAMPLER_PATHS = ("ddim", "euler", "dpmpp_2m", "ddpm")


def _betas(config: dict, where: str) -> np.ndarray:
    count = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], np.float64)
        if betas.shape != (count,):
            raise ValueError(f"{where}: trained_betas has {betas.size} values for num_train_timesteps={count}")
        return betas
    kind = config.get("beta_schedule", "linear")
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    # diffusers computes these in float32; the cumulative product below follows it.
    if kind == "linear":
        return np.linspace(start, end, count, dtype=np.float32)
    if kind == "scaled_linear":
        return np.linspace(start**0.5, end**0.5, count, dtype=np.float32) ** 2
    if kind == "squaredcos_cap_v2":
        f = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
        steps = np.arange(count, dtype=np.float64)
        return np.minimum(1 - f((steps + 1) / count) / f(steps / count), 0.999).astype(np.float32)
    raise ValueError(f"{where}: beta_schedule {kind!r} is not supported (supported: {BETA_SCHEDULES})")


@dataclasses.dataclass(frozen=True, eq=False)
class SchedulerSpec:
    """The noise levels and step rules of a diffusers scheduler config."""

    alphas_cumprod: np.ndarray  # float32 [T], as diffusers holds it
    prediction: str  # "eps", "v" or "x0"
    spacing: str
    steps_offset: int
    final_alpha: float  # where DDIM's last step lands: 1, or alphas_cumprod[0] (set_alpha_to_one=False)
    clip_sample: float | None  # clamp the predicted clean latents to +-this, or None
    source: str = ""

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def timesteps(self, steps: int) -> np.ndarray:
        """The timesteps (float: Euler's linspace ones fall between integers) diffusers visits."""
        count = self.num_timesteps
        if not 1 <= steps <= count:
            raise ValueError(f"steps must be in [1, {count}], got {steps}")
        if self.spacing == "linspace":
            return np.linspace(0, count - 1, steps, dtype=np.float64)[::-1].copy()
        if self.spacing == "leading":
            ratio = count // steps
            return (np.arange(0, steps) * ratio).round()[::-1].astype(np.float64) + self.steps_offset
        ratio = count / steps
        return np.round(np.arange(count, 0, -ratio)).astype(np.float64) - 1

    def path(self, sampler: str, steps: int, strength: float = 1.0):
        """`(t_model, abar_t, abar_next)`, float32 `[S]` each: a step's model timestep, its noise
        level and the level it moves to. `strength` < 1 starts part of the way, as diffusers'
        img2img does (the last `int(steps * strength)` of the `steps` timesteps)."""
        if sampler not in SAMPLER_PATHS:
            raise ValueError(f"sampler must be one of {SAMPLER_PATHS}, got {sampler!r}")
        ts = self.timesteps(steps)
        abar = self.alphas_cumprod.astype(np.float64)
        if sampler == "euler":
            # EulerDiscreteScheduler: sigma = sqrt((1 - abar) / abar) interpolated at the
            # (possibly fractional) timesteps, then a final sigma of 0; abar = 1 / (1 + sigma^2).
            sigmas = np.sqrt((1 - abar) / abar)
            sig = np.interp(ts, np.arange(len(sigmas)), sigmas)
            level = 1.0 / (1.0 + sig**2)
            nxt = np.concatenate([level[1:], [1.0]])
        else:
            ts = np.round(ts)
            if np.any(ts >= self.num_timesteps):
                raise ValueError(f"{self.source}: {steps} steps with steps_offset={self.steps_offset} reach "
                                 f"timestep {int(ts.max())}, past the schedule's {self.num_timesteps}")
            level = abar[ts.astype(np.int64)]
            if sampler == "ddim":
                # DDIMScheduler steps from t to t - T // steps, whatever the next visited timestep.
                prev = ts.astype(np.int64) - self.num_timesteps // steps
                nxt = np.where(prev >= 0, abar[np.maximum(prev, 0)], self.final_alpha)
            else:
                nxt = np.concatenate([level[1:], [1.0]])
        start = steps - min(max(int(steps * strength), 1), steps) if strength < 1.0 else 0
        as32 = lambda a: np.asarray(a[start:], np.float32)  # noqa: E731
        return as32(ts), as32(level), as32(nxt)

    def noise_scale(self, sampler: str, steps: int) -> float:
        """The factor on unit noise that starts a run, in the project's variance-preserving
        latents (diffusers' `init_noise_sigma`, seen from there): 1 except Euler with linspace
        or trailing spacing, which starts at sigma_max rather than sqrt(sigma_max^2 + 1)."""
        if sampler != "euler" or self.spacing == "leading":
            return 1.0
        _, level, _ = self.path("euler", steps)
        return float(np.sqrt(1.0 - level[0]))


def from_config(config: dict, source: str = "scheduler config") -> SchedulerSpec:
    """A SchedulerSpec from a scheduler_config.json's fields; refuses what it cannot follow."""
    unknown = sorted(set(config) - READ - IGNORED - set(NEUTRAL))
    if unknown:
        raise ValueError(f"{source}: unknown scheduler field {unknown[0]!r}; known: {sorted(READ | set(NEUTRAL))}")
    for key, neutral in NEUTRAL.items():
        value = config.get(key, neutral)
        if value != neutral and not (key == "variance_type" and value in ("fixed_small", "fixed_small_log")):
            raise ValueError(f"{source}: {key}={value!r} is not supported (only {neutral!r})")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise ValueError(f"{source}: prediction_type {prediction!r} is not supported (supported: {tuple(PREDICTIONS)})")
    kind = config.get("_class_name", "")
    spacing = config.get("timestep_spacing", "linspace" if kind in LINSPACE_BY_DEFAULT else "leading")
    if spacing not in SPACINGS:
        raise ValueError(f"{source}: timestep_spacing {spacing!r} is not supported (supported: {SPACINGS})")
    alphas_cumprod = np.cumprod(1.0 - _betas(config, source), axis=0, dtype=np.float32)
    clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", kind in CLIPS_BY_DEFAULT) else None
    final = 1.0 if config.get("set_alpha_to_one", True) else float(alphas_cumprod[0])
    return SchedulerSpec(alphas_cumprod=alphas_cumprod, prediction=PREDICTIONS[prediction], spacing=spacing,
                         steps_offset=int(config.get("steps_offset", 0)), final_alpha=final, clip_sample=clip,
                         source=source)


def read(folder: str) -> SchedulerSpec:
    """The spec in `folder`/scheduler_config.json."""
    path = os.path.join(folder, "scheduler_config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder}: no scheduler_config.json")
    with open(path, encoding="utf-8") as f:
        return from_config(json.load(f), path)
