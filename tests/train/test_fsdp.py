"""Sharded parameters (train.param_sharding=fsdp) on 8 fake CPU devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmjax import sharding, zoo
from mmjax.checkpoint import Checkpointer, restore_numpy
from mmjax.train.loop import train
from mmjax.train.state import create_state, make_optimizers
from mmjax.train.step import make_train_step
from tests.families.test_families import one_batch
from tests.helpers import read_metrics, tiny_config

# The tiny CNN's arrays are small (31.6k parameters in all): shard everything from 256 elements,
# so that the tests see the split on most leaves.
MIN_SIZE = 256


@pytest.fixture
def small_leaves_shard(monkeypatch):
    monkeypatch.setattr(sharding, "FSDP_MIN_SIZE", MIN_SIZE)


def test_leaf_spec_splits_the_largest_divisible_dimension():
    assert sharding.leaf_spec((3, 3, 64, 128), 8, min_size=0) == P(None, None, None, "data")
    assert sharding.leaf_spec((1024, 64), 8, min_size=0) == P("data")
    assert sharding.leaf_spec((1001, 64), 8, min_size=0) == P(None, "data")  # 1001 is not divisible by 8
    assert sharding.leaf_spec((9, 7), 8, min_size=0) == P()  # nothing divides: replicated
    assert sharding.leaf_spec((64, 64), 8) == P()  # small: replicated
    assert sharding.leaf_spec((256, 256), 1, min_size=0) == P()
    with pytest.raises(ValueError, match="param sharding must be one of"):
        sharding.state_shardings({}, sharding.make_mesh(), "zero3")


def _step_setup(config, mode, devices=None):
    family, model = zoo.FAMILIES[config.family], zoo.build_model(config)
    objectives = family.objectives(model, config)
    optimizers, schedules = make_optimizers(objectives, config)
    init_fn = functools.partial(create_state, family, model, config, optimizers, objectives)
    mesh = sharding.make_mesh(devices)
    shardings = sharding.state_shardings(jax.eval_shape(init_fn), mesh, mode)
    state = jax.jit(init_fn, out_shardings=shardings)()
    step = jax.jit(make_train_step(objectives, optimizers, schedules, ema_decay=config.train.ema_decay),
                   in_shardings=(shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(shardings, sharding.replicated(mesh)))
    return state, step, mesh


def test_fsdp_steps_equal_replicated_and_state_per_device_falls_8x(small_leaves_shard):
    config = tiny_config("cnn_shapes", "optim.warmup_steps=0")
    batch = one_batch(config, size=16)
    runs = {}
    for mode in sharding.PARAM_SHARDINGS:
        state, step, mesh = _step_setup(config, mode)
        before = state
        losses = []
        for _ in range(3):
            state, metrics = step(state, sharding.to_device({k: np.asarray(v) for k, v in batch.items()}, mesh))
            losses.append(float(metrics["loss"]))
        runs[mode] = (before, state, losses)
    np.testing.assert_allclose(runs["fsdp"][2], runs["replicated"][2], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
                 runs["fsdp"][1].params, runs["replicated"][1].params)
    # The state stays sharded across steps (the step's outputs keep the layout).
    fsdp_state = runs["fsdp"][1]
    large = [leaf for leaf in jax.tree.leaves(fsdp_state.params) if leaf.size >= MIN_SIZE]
    assert large and all(not leaf.sharding.is_fully_replicated for leaf in large)

    def large_bytes(state):
        tree = (state.params, state.opt_state, state.ema_params)
        return sharding.bytes_per_device([x for x in jax.tree.leaves(tree) if x.size >= MIN_SIZE
                                          and jnp.issubdtype(x.dtype, jnp.floating)])

    ratio = large_bytes(runs["replicated"][1]) / large_bytes(fsdp_state)
    assert 7.0 < ratio <= 8.0, ratio
    assert sharding.bytes_per_device(jax.tree.leaves(runs["replicated"][1])) > 4 * sharding.bytes_per_device(
        jax.tree.leaves(fsdp_state))


def test_fsdp_resumes_exactly_and_restores_on_another_mesh(small_leaves_shard, tmp_path):
    config = tiny_config("cnn_shapes", "train.param_sharding=fsdp", "train.eval_every=0", "train.sample_every=0")
    straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")
    straight = train(config, straight_dir)
    assert train(config, resumed_dir, stop_at=10).step == 10
    resumed = train(config, resumed_dir)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight.state.params),
                 jax.device_get(resumed.state.params))
    a, b = read_metrics(straight_dir), read_metrics(resumed_dir)
    assert [a[s]["loss"] for s in range(1, 21)] == [b[s]["loss"] for s in range(1, 21)]
    leaf = jax.tree.leaves(straight.state.params)[0]
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(straight.state.params)), leaf.sharding

    # Written by 8 devices under fsdp; restored on 4 devices, under either mode.
    family, model = zoo.FAMILIES[config.family], zoo.build_model(config)
    objectives = family.objectives(model, config)
    optimizers, _ = make_optimizers(objectives, config)
    abstract = jax.eval_shape(functools.partial(create_state, family, model, config, optimizers, objectives))
    saved = restore_numpy(straight_dir).state
    four = sharding.make_mesh(jax.devices()[:4])
    for mode in sharding.PARAM_SHARDINGS:
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract,
                              sharding.state_shardings(abstract, four, mode))
        with Checkpointer(straight_dir, read_only=True) as ckpt:
            restored = ckpt.restore(target).state
        assert {d.id for x in jax.tree.leaves(restored.params) for d in x.sharding.device_set} == {
            d.id for d in jax.devices()[:4]}
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                     jax.device_get(restored.params), saved["params"])


def test_the_config_names_the_modes():
    from mmjax.config import ConfigError

    with pytest.raises(ConfigError, match="train.param_sharding"):
        tiny_config("cnn_shapes", "train.param_sharding=zero")


# Three compiles of every family's step: the families with the largest steps (8 minutes on the
# 2-core CPU for all six) run in the slow lane, the CNN's in every run (with
# test_fsdp_steps_equal_replicated..., which covers the mechanism on a text-conditioned model).
_SLOW_STEPS = ("clip", "diffusion", "flow", "gan", "vae")


@pytest.mark.e2e
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_STEPS else n
                                  for n in sorted(zoo.FAMILIES)])
def test_one_device_and_eight_devices_give_the_same_losses(name):
    """Every family's step on the same global batch: 1 device, 8 devices (batch split 2 each),
    and 8 devices with fsdp, for two steps (the second loss sees the first update)."""
    config = tiny_config(f"{name}_shapes", "optim.warmup_steps=0")
    batch = {k: np.asarray(v) for k, v in one_batch(config, size=16).items()}
    losses = {}
    for label, mode, devices in (("one", "replicated", jax.devices()[:1]), ("eight", "replicated", None),
                                 ("fsdp", "fsdp", None)):
        state, step, mesh = _step_setup(config, mode, devices)
        values = []
        for _ in range(2):
            state, metrics = step(state, sharding.to_device(batch, mesh))
            values.append({k: float(v) for k, v in metrics.items() if k.endswith("loss")})
        losses[label] = values
    assert losses["one"][0], losses
    for label in ("eight", "fsdp"):
        for a, b in zip(losses["one"], losses[label]):
            assert a.keys() == b.keys()
            for key in a:
                assert b[key] == pytest.approx(a[key], rel=2e-4, abs=1e-5), (label, key, a[key], b[key])
