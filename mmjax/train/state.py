"""The train state and its optimizers, shared by every family."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from mmjax.families.family import Objective, example_batch


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: dict[str, Any]  # one entry per objective
    ema_params: Any
    rng: jax.Array  # raw uint32 key data: checkpoints hold plain arrays, never typed keys
    # Variables no optimizer trains but the objectives update (spectral-norm vectors, an
    # augmentation probability); None for most families, which adds no checkpoint leaves.
    model_state: Any = None


def make_schedule(optim_cfg, num_steps: int) -> optax.Schedule:
    warmup = min(optim_cfg.warmup_steps, max(num_steps - 1, 0))
    if optim_cfg.schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(optim_cfg.lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, optim_cfg.lr, warmup), optax.constant_schedule(optim_cfg.lr)],
            [warmup],
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else optim_cfg.lr,
        peak_value=optim_cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1),
        end_value=optim_cfg.lr * optim_cfg.min_lr_ratio,
    )


def make_optimizer(optim_cfg, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    if optim_cfg.name != "adamw":
        raise ValueError(f"config key 'optim.name': unknown optimizer {optim_cfg.name!r}; known: ['adamw']")
    schedule = make_schedule(optim_cfg, num_steps)
    parts = []
    if optim_cfg.grad_clip and optim_cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
    parts.append(
        optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, weight_decay=optim_cfg.weight_decay)
    )
    return optax.chain(*parts), schedule


def make_optimizers(objectives, config) -> tuple[dict, dict]:
    """Each objective's optimizer and learning-rate schedule, from its config section."""
    optimizers, schedules = {}, {}
    for objective in objectives:
        optimizers[objective.name], schedules[objective.name] = make_optimizer(
            config[objective.optim_section], config.train.num_steps)
    return optimizers, schedules


def objective_params(params, objective: Objective):
    return params if objective.params_key is None else params[objective.params_key]


def create_state(family, model, config, optimizers: dict[str, optax.GradientTransformation],
                 objectives: tuple[Objective, ...]) -> TrainState:
    """Pure: called under `jax.jit(..., out_shardings=...)`, or `jax.eval_shape` for the target."""
    key = jax.random.key(config.train.seed)
    init_key, state_key = jax.random.split(key)
    batch = {k: jnp.asarray(v) for k, v in example_batch(config).items()}
    params, model_state = family.init(model, init_key, batch, config)
    opt_state = {
        obj.name: optimizers[obj.name].init(objective_params(params, obj)) for obj in objectives
    }
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=opt_state,
        ema_params=jax.tree.map(jnp.copy, params),
        rng=jax.random.key_data(state_key),
        model_state=model_state,
    )
