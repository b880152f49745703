"""The one train step every family runs.

`train_step(state, batch) -> (state, metrics)` is pure and compiled once per run. A family
contributes only its objectives (loss functions); everything else is shared: gradient
accumulation, clipping and the optimizer (inside the optax chain), skipping a non-finite
update, the EMA of the parameters, and the metrics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mmjax.families.family import Objective
from mmjax.train.state import TrainState, objective_params


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def keep_if(ok: jax.Array, new, old):
    """`new` where `ok`, else `old`, for whole pytrees.

    On CPU a `lax.cond`: XLA:CPU compile time exploded (minutes) on a UNet when every leaf's
    select hung off the one predicate. Elsewhere a select per leaf, which fuses into the
    optimizer's elementwise kernels: XLA:GPU runs a `cond` by copying its predicate to the
    host, a device-to-host sync in every step.
    """
    if jax.default_backend() == "cpu":
        return jax.lax.cond(ok, lambda a, b: a, lambda a, b: b, new, old)
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def _split_microbatches(batch, grad_accum: int):
    return jax.tree.map(lambda x: x.reshape((grad_accum, -1) + x.shape[1:]), batch)


def _grads(objective: Objective, params, batch, key, step, grad_accum: int, model_state):
    """Loss, metrics, gradients (averaged over `grad_accum` microbatches) and the model state
    after the objective (threaded through the microbatches in order)."""
    own = objective_params(params, objective)

    def loss_of(own_params, microbatch, micro_key, state_in):
        full = own_params if objective.params_key is None else {**params, objective.params_key: own_params}
        return objective.loss_fn(full, microbatch, micro_key, step, state_in)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)
    if grad_accum == 1:
        (loss, aux), grads = grad_fn(own, batch, key, model_state)
        return loss, aux.metrics, grads, aux.model_state

    micro = _split_microbatches(batch, grad_accum)

    def body(carry, inputs):
        total, state_in = carry
        index, microbatch = inputs
        (loss, aux), grads = grad_fn(own, microbatch, jax.random.fold_in(key, index), state_in)
        total = jax.tree.map(jnp.add, total, (loss, aux.metrics, grads))
        return (total, aux.model_state), None

    (loss0, aux0), grads0 = jax.eval_shape(grad_fn, own, jax.tree.map(lambda x: x[0], micro), key, model_state)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss0, aux0.metrics, grads0))
    ((loss, metrics, grads), model_state), _ = jax.lax.scan(
        body, (zeros, model_state), (jnp.arange(grad_accum), micro))
    loss, metrics, grads = jax.tree.map(lambda x: x / grad_accum, (loss, metrics, grads))
    return loss, metrics, grads, model_state


def _trained_keys(objectives, params) -> list | None:
    """Top-level params entries some objective updates (None: the whole tree)."""
    keys = [o.params_key for o in objectives]
    return None if None in keys or not isinstance(params, dict) else sorted(set(keys))


def make_train_step(objectives: tuple[Objective, ...], optimizers: dict[str, optax.GradientTransformation],
                    schedules: dict[str, optax.Schedule], *, ema_decay: float, grad_accum: int = 1):
    """Returns the (un-jitted) step; `step.trace_count[0]` counts how often it was traced."""
    trace_count = [0]
    single = len(objectives) == 1

    def train_step(state: TrainState, batch) -> tuple[TrainState, dict]:
        trace_count[0] += 1
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        params, opt_states, metrics = state.params, dict(state.opt_state), {}
        model_state = state.model_state
        all_ok = jnp.bool_(True)
        for index, objective in enumerate(objectives):
            loss, aux, grads, new_model_state = _grads(objective, params, batch, jax.random.fold_in(key, index),
                                                       state.step, grad_accum, model_state)
            own = objective_params(params, objective)
            updates, new_opt = optimizers[objective.name].update(grads, opt_states[objective.name], own)
            new_own = optax.apply_updates(own, updates)
            # A non-finite loss, gradient or update must never reach the parameters: keep the
            # old ones, and let the host decide (from `nonfinite`) whether to halt.
            ok = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(new_own)
            ok = ok & _all_finite(new_model_state)
            new_own, new_opt, model_state = keep_if(
                ok, (new_own, new_opt, new_model_state), (own, opt_states[objective.name], model_state))
            params = new_own if objective.params_key is None else {**params, objective.params_key: new_own}
            opt_states[objective.name] = new_opt
            all_ok &= ok
            prefix = "" if single else f"{objective.name}/"
            metrics[f"{prefix}loss"] = loss
            metrics[f"{prefix}grad_norm"] = optax.tree.norm(grads)
            metrics[f"{prefix}lr"] = schedules[objective.name](state.step)
            metrics.update({f"{prefix}{k}": v for k, v in aux.items()})

        # EMA with a short warm-up so early samples are not dominated by the random init.
        # A skipped step leaves the EMA alone.
        decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
        # Only what an objective trains has an average; frozen entries (a latent model's
        # VAE) are carried over bit for bit.
        trained = _trained_keys(objectives, params)
        pick = (lambda tree: tree) if trained is None else (lambda tree: {k: tree[k] for k in trained})  # noqa: E731
        old_ema = pick(state.ema_params)
        ema = keep_if(all_ok, jax.tree.map(lambda a, b: decay * a + (1.0 - decay) * b, old_ema, pick(params)),
                      old_ema)
        if trained is not None:
            ema = {**state.ema_params, **ema}
        metrics["nonfinite"] = jnp.where(all_ok, 0, 1).astype(jnp.int32)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_states, ema_params=ema,
                                  model_state=model_state)
        return new_state, metrics

    train_step.trace_count = trace_count
    return train_step
