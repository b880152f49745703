"""Every family, through the shared step: overfits one batch, params f32 under bf16 compute."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import zoo
from mmjax.data import pipeline, tokenizer
from mmjax.train.state import create_state, make_optimizer
from mmjax.train.step import make_train_step
from tests.helpers import tiny_config


def one_batch(config, size=16):
    source = pipeline.make_source(config.data, "train")
    batches = pipeline.make_batches(source, global_batch=size, tokenizer=tokenizer.for_config(config), seed=0)
    return {k: jnp.asarray(v) for k, v in next(batches).items()}


def fit(config, steps):
    family = zoo.FAMILIES[config.family]
    model = zoo.build_model(config)
    objectives = family.objectives(model, config)
    optimizers, schedules = {}, {}
    for o in objectives:
        optimizers[o.name], schedules[o.name] = make_optimizer(config[o.optim_section], steps)
    state = jax.jit(functools.partial(create_state, family, model, config, optimizers, objectives))()
    step = make_train_step(objectives, optimizers, schedules, ema_decay=0.0)
    jitted = jax.jit(step, donate_argnums=0)
    batch = one_batch(config)
    history = []
    for _ in range(steps):
        state, metrics = jitted(state, batch)
        history.append(jax.device_get(metrics))
    assert step.trace_count[0] == 1
    return family, model, state, batch, history


@pytest.mark.parametrize("name, overrides, steps, metric, factor", [
    ("cnn_shapes", ["optim.lr=3e-3"], 60, "loss", 0.1),
    ("vae_shapes", ["optim.lr=3e-3", "loss.beta=0.0"], 60, "mse", 0.3),
    ("clip_shapes", ["optim.lr=3e-3", "loss.multi_positive=False"], 60, "loss", 0.3),
])
@pytest.mark.e2e
def test_overfits_one_batch(name, overrides, steps, metric, factor):
    config = tiny_config(name, "optim.warmup_steps=0", "optim.schedule=constant", *overrides)
    _, _, _, _, history = fit(config, steps)
    assert history[-1][metric] < factor * history[0][metric], (history[0][metric], history[-1][metric])
    assert all(h["nonfinite"] == 0 for h in history)


@pytest.mark.e2e
def test_cnn_learns_every_head_on_one_batch():
    config = tiny_config("cnn_shapes", "optim.lr=3e-3", "optim.warmup_steps=0", "optim.schedule=constant")
    _, _, _, _, history = fit(config, 80)
    for head in ("shape", "color", "size", "position"):
        assert history[-1][f"accuracy_{head}"] == 1.0, head


@pytest.mark.parametrize("name", ["cnn_shapes", "vae_shapes", "clip_shapes"])
@pytest.mark.e2e
def test_bfloat16_compute_keeps_float32_params(name):
    config = tiny_config(name, "dtype=bfloat16")
    _, model, state, _, history = fit(config, 2)
    assert model.dtype == jnp.bfloat16
    for leaf in jax.tree.leaves(state.params) + jax.tree.leaves(state.ema_params):
        assert leaf.dtype == jnp.float32
    assert np.isfinite(history[-1]["loss"])


def test_grad_accumulation_matches_full_batch():
    config = tiny_config("cnn_shapes")
    family = zoo.FAMILIES["cnn"]
    model = zoo.build_model(config)
    objectives = family.objectives(model, config)
    optimizers, schedules = {}, {}
    for o in objectives:
        optimizers[o.name], schedules[o.name] = make_optimizer(config[o.optim_section], 10)
    init = jax.jit(functools.partial(create_state, family, model, config, optimizers, objectives))
    batch = one_batch(config)
    full = jax.jit(make_train_step(objectives, optimizers, schedules, ema_decay=0.0))(init(), batch)
    accum = jax.jit(make_train_step(objectives, optimizers, schedules, ema_decay=0.0, grad_accum=4))(init(), batch)
    np.testing.assert_allclose(full[1]["loss"], accum[1]["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 full[0].params, accum[0].params)
