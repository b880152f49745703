"""Checkpoints survive what training runs meet: exits, kills, damaged files, NaNs, full disks."""
import gc
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from mmjax import checkpoint as ckpt
from mmjax.checkpoint import (CheckpointError, Checkpointer, NoCheckpointError,
                              NonFiniteStateError, restore_numpy)

REPO = pathlib.Path(__file__).resolve().parents[1]

# When a damaged file fails a restore, Orbax abandons its other read coroutines; Python
# reports them as unraisable whenever they are collected. Collect them inside this module's
# tests, where they are expected, rather than at interpreter exit.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def _collect_abandoned_coroutines():
    yield
    gc.collect()


@struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    key: jax.Array


def make_state(seed: int = 0, width: int = 64):
    """A train-state-like pytree: float32 + bfloat16 params, adam moments, int step, key."""
    rng = np.random.default_rng(seed)
    params = {
        "dense": {"w": jnp.asarray(rng.standard_normal((width, 32)), jnp.float32),
                  "b": jnp.asarray(rng.standard_normal(32), jnp.float32)},
        "embed": {"table": jnp.asarray(rng.standard_normal((8, 16)), jnp.bfloat16)},
    }
    return TrainState(step=jnp.array(seed, jnp.int32), params=params,
                      opt_state=optax.adam(1e-3).init(params),
                      key=jax.random.key_data(jax.random.key(seed)))


def abstract(state, sharding=None):
    sharding = sharding or SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        jax.eval_shape(lambda: state))


def leaves_by_path(tree) -> dict:
    return dict(zip(ckpt._paths(tree), (np.asarray(x) for x in jax.tree.leaves(tree))))


def assert_bitwise_equal(got, want):
    got, want = leaves_by_path(got), leaves_by_path(want)
    assert got.keys() == want.keys()
    for path in want:
        assert got[path].dtype == want[path].dtype, path
        assert got[path].shape == want[path].shape, path
        assert got[path].tobytes() == want[path].tobytes(), path


def save_steps(workdir, steps, **options) -> dict:
    states = {step: make_state(seed=step) for step in steps}
    with Checkpointer(workdir, **options) as c:
        for step in steps:
            assert c.save(step, states[step], config={"model": "tiny", "lr": 1e-3},
                          data_state={"next_batch": 10 * step})
    return states


def entries(workdir) -> set[str]:
    root = pathlib.Path(workdir) / "checkpoints"
    return {p.name for p in root.iterdir()} if root.exists() else set()


def run_python(code: str, *, devices: int = 8, timeout: int = 120):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=timeout)


# --- round trips --------------------------------------------------------------------------


def test_round_trip_is_bitwise_and_survives_donation(tmp_path):
    state = make_state(seed=3)
    want = jax.device_get(state)
    config = {"model": {"width": 64}, "lr": 1e-3, "name": "tiny"}
    with Checkpointer(tmp_path) as c:
        assert c.save(7, state, config=config, data_state={"next_batch": 123})
        # A jitted step with donate_argnums frees the buffers right after save() returns.
        for leaf in jax.tree.leaves(state):
            leaf.delete()
    with Checkpointer(tmp_path) as c:
        assert c.latest_step() == 7 and c.all_steps() == [7]
        restored = c.restore(abstract(want))
        assert c.restore_config() == config
    assert isinstance(restored.state, TrainState)
    assert (restored.step, restored.config, restored.data_state) == (7, config, {"next_batch": 123})
    assert_bitwise_equal(restored.state, want)


@pytest.mark.e2e
def test_saved_on_eight_devices_restores_on_one_and_as_numpy(tmp_path):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    state = make_state(seed=1)
    state = state.replace(
        params=jax.tree.map(lambda x: jax.device_put(x, sharded if x.shape[0] % 8 == 0
                                                     else replicated), state.params),
        step=jax.device_put(state.step, replicated), key=jax.device_put(state.key, replicated))
    assert len(state.params["dense"]["w"].sharding.device_set) == 8
    with Checkpointer(tmp_path) as c:
        c.save(1, state, config={}, data_state={"next_batch": 1})

    with Checkpointer(tmp_path, read_only=True) as c:
        one_device = c.restore(abstract(state))
        everywhere = c.restore(abstract(state, replicated))
    assert one_device.state.params["dense"]["w"].sharding == SingleDeviceSharding(jax.devices()[0])
    assert everywhere.state.params["dense"]["w"].sharding == replicated
    assert_bitwise_equal(one_device.state, state)
    assert_bitwise_equal(everywhere.state, state)

    host = restore_numpy(tmp_path)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host.state))
    assert host.state["params"]["dense"]["w"].shape == (64, 32)
    assert_bitwise_equal(host.state, state)

    # And in a process that really has one device, as `sample.py` on a laptop would.
    np.savez(tmp_path / "want.npz", **leaves_by_path(state))
    result = run_python(f"""
        import jax, numpy as np
        from jax.sharding import SingleDeviceSharding
        from mmjax.checkpoint import Checkpointer, restore_numpy, _paths
        assert jax.device_count() == 1
        want = np.load({str(tmp_path / "want.npz")!r})
        host = restore_numpy({str(tmp_path)!r})
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=SingleDeviceSharding(jax.devices()[0])), host.state)
        with Checkpointer({str(tmp_path)!r}, read_only=True) as c:
            device = c.restore(target)
        for tree in (host.state, device.state):
            for path, leaf in zip(_paths(tree), jax.tree.leaves(tree)):
                assert np.asarray(leaf).tobytes() == want[path].tobytes(), path
        print("ok")
    """, devices=1)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_fingerprint_is_sharding_independent_and_sees_one_bit(tmp_path):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(0)
    for host in (rng.standard_normal((16, 3)).astype(np.float32),
                 rng.standard_normal((16,)).astype(jnp.bfloat16),
                 rng.integers(-100, 100, (8, 2)).astype(np.int8),
                 rng.integers(0, 2, (8,)).astype(bool),
                 np.array(5, np.int32)):
        spec = P("data") if host.ndim else P()
        on_device = jax.device_put(host, NamedSharding(mesh, spec))
        digest = np.asarray(jax.jit(lambda x: ckpt._fingerprint(x, jnp))(on_device))
        np.testing.assert_array_equal(digest, ckpt._fingerprint(host, np))
        flipped = host.copy().reshape(-1).view(np.uint8)
        flipped[flipped.size // 2] ^= 1
        flipped = flipped.view(host.dtype).reshape(host.shape)
        assert not np.array_equal(ckpt._fingerprint(flipped, np), digest)


# --- retention ----------------------------------------------------------------------------


def test_keeps_latest_n_and_best_n_separately(tmp_path):
    options = dict(keep_latest=2, keep_best=1, best_metric="acc", best_mode="max")
    accuracy = {1: 0.1, 2: 0.9, 3: 0.3, 4: 0.4, 5: 0.5, 6: 0.6, 7: 0.2}
    state = make_state()
    with Checkpointer(tmp_path, **options) as c:
        for step in range(1, 7):
            c.save(step, state, config={}, data_state={}, metrics={"acc": accuracy[step]})
    assert entries(tmp_path) >= {"2", "5", "6"}
    assert {e for e in entries(tmp_path) if e.isdigit()} == {"2", "5", "6"}
    # After a restart the scores come back from disk: the best step is still kept.
    with Checkpointer(tmp_path, **options) as c:
        assert c.all_steps() == [2, 5, 6]
        c.save(7, state, config={}, data_state={}, metrics={"acc": accuracy[7]})
    with Checkpointer(tmp_path, **options) as c:
        assert c.all_steps() == [2, 6, 7]


def test_min_mode_and_no_metric_keep_latest_only(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path / "min", keep_latest=1, best_metric="loss", best_mode="min") as c:
        for step, loss in ((1, 0.5), (2, 0.1), (3, 0.7), (4, 0.9)):
            c.save(step, state, config={}, data_state={}, metrics={"loss": loss})
    assert {e for e in entries(tmp_path / "min") if e.isdigit()} == {"2", "4"}
    with Checkpointer(tmp_path / "latest", keep_latest=2) as c:
        for step in range(1, 5):
            c.save(step, state, config={}, data_state={}, metrics={"acc": step})
        assert c.all_steps() == [3, 4]


# --- exits, kills and failed writes -------------------------------------------------------


def test_with_block_exit_leaves_finished_step(tmp_path):
    with Checkpointer(tmp_path) as c:
        c.save(1, make_state(width=4096), config={}, data_state={})
    assert entries(tmp_path) & {"1"} and not any("tmp" in e for e in entries(tmp_path))


@pytest.mark.e2e
def test_save_right_before_sys_exit_is_durable(tmp_path):
    result = run_python(f"""
        import sys, jax, jax.numpy as jnp
        from mmjax.checkpoint import Checkpointer
        state = {{"w": jax.random.normal(jax.random.key(0), (1024, 1024)),
                  "step": jnp.array(5, jnp.int32)}}
        with Checkpointer({str(tmp_path)!r}) as c:
            c.save(5, state, config={{"lr": 0.1}}, data_state={{"next_batch": 5}})
            sys.exit(0)
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "5" in entries(tmp_path) and not any("tmp" in e for e in entries(tmp_path))
    restored = restore_numpy(tmp_path)
    want = np.asarray(jax.random.normal(jax.random.key(0), (1024, 1024)))
    assert restored.step == 5 and restored.data_state == {"next_batch": 5}
    assert restored.state["w"].tobytes() == want.tobytes()


def test_unfinished_step_is_never_loaded(tmp_path):
    states = save_steps(tmp_path, [1, 2])
    root = tmp_path / "checkpoints"
    # What a kill -9 in the middle of saving step 3 leaves behind (here: complete-looking).
    shutil.copytree(root / "2", root / "3.orbax-checkpoint-tmp-1767225600")
    with Checkpointer(tmp_path, read_only=True) as c:
        assert c.latest_step() == 2
        assert c.restore(abstract(states[2])).step == 2
    assert restore_numpy(tmp_path).step == 2
    with Checkpointer(tmp_path) as c:
        assert c.restore(abstract(states[2])).step == 2
        assert c.save(3, states[2], config={}, data_state={})
    assert {e for e in entries(tmp_path) if e[0].isdigit()} == {"1", "2", "3"}


@pytest.mark.e2e
def test_failed_async_save_surfaces_at_wait_save_and_close(tmp_path):
    # A file-size limit makes the background array write fail like a full disk does; chmod
    # would not stop root. The limit stays on until the failure has surfaced.
    result = run_python(f"""
        import os, resource, signal, jax
        from mmjax.checkpoint import Checkpointer, CheckpointError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        state = {{"w": jax.random.normal(jax.random.key(0), (512, 512))}}
        for surface in ("wait", "save", "close"):
            c = Checkpointer(os.path.join({str(tmp_path)!r}, surface))
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
            assert c.save(1, state, config={{}}, data_state={{}})
            try:
                if surface == "wait":
                    c.wait()
                elif surface == "save":
                    c.save(2, state, config={{}}, data_state={{}})
                else:
                    c.close()
                print(surface, "swallowed")
            except CheckpointError as e:
                assert "step 1" in str(e) and "File too large" in str(e), e
                print(surface, "raised")
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
            c.close()
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["wait", "raised", "save", "raised", "close", "raised"]
    for surface in ("wait", "save", "close"):
        assert not {e for e in entries(tmp_path / surface) if e.isdigit()}
        with pytest.raises(NoCheckpointError):
            restore_numpy(tmp_path / surface)


# --- damage -------------------------------------------------------------------------------


def _largest_state_file(step_dir: pathlib.Path) -> pathlib.Path:
    # The 64x32 float32 leaf of random numbers does not compress: the largest file under the
    # state item holds array bytes, whatever Orbax names its files.
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    assert largest.stat().st_size >= 64 * 32 * 4 // 2, largest
    return largest


def truncate_data(step_dir):
    path = _largest_state_file(step_dir)
    os.truncate(path, path.stat().st_size // 2)


def overwrite_data(step_dir):
    path = _largest_state_file(step_dir)
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(bytes(8))


def delete_metadata(step_dir):
    found = [p for p in step_dir.rglob("*") if "METADATA" in p.name.upper() and p.is_file()]
    assert found
    for path in found:
        path.unlink()


def empty_directory(step_dir):
    shutil.rmtree(step_dir)
    step_dir.mkdir()


@pytest.mark.parametrize("damage", [truncate_data, overwrite_data, delete_metadata,
                                    empty_directory])
def test_damaged_latest_step_falls_back_loudly(tmp_path, caplog, damage):
    states = save_steps(tmp_path, [1, 2])
    damage(tmp_path / "checkpoints" / "2")
    with caplog.at_level(logging.WARNING, logger="mmjax.checkpoint"):
        host = restore_numpy(tmp_path)
        with Checkpointer(tmp_path) as c:
            restored = c.restore(abstract(states[1]))
            # The damaged step is moved aside, or Orbax would skip the resumed run's save of
            # step 2 as "not newer than the latest".
            assert c.all_steps() == [1]
            assert c.save(2, states[2], config={}, data_state={"next_batch": 20})
    assert host.step == restored.step == 1 and restored.data_state == {"next_batch": 10}
    assert_bitwise_equal(restored.state, states[1])
    assert_bitwise_equal(host.state, states[1])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 2" in w and "cannot be restored" in w for w in warnings), warnings
    assert len(list((tmp_path / "checkpoints.damaged").iterdir())) == 1
    with Checkpointer(tmp_path, read_only=True) as c:
        assert c.restore(abstract(states[2])).data_state == {"next_batch": 20}


def test_every_step_damaged_is_a_clear_error(tmp_path):
    """Also: an explicit step is never swapped for another; targets must carry shardings."""
    states = save_steps(tmp_path, [1, 2])
    truncate_data(tmp_path / "checkpoints" / "1")
    empty_directory(tmp_path / "checkpoints" / "2")
    with Checkpointer(tmp_path, read_only=True) as c, pytest.raises(CheckpointError) as info:
        c.restore(abstract(states[1]))
    assert not isinstance(info.value, NoCheckpointError)
    assert "every checkpoint" in str(info.value)
    assert "step 2:" in str(info.value) and "step 1:" in str(info.value)
    with pytest.raises(CheckpointError, match="every checkpoint"):
        restore_numpy(tmp_path)
    with Checkpointer(tmp_path, read_only=True) as c:
        with pytest.raises(CheckpointError, match="step 1 .* is damaged"):
            c.restore(abstract(states[1]), step=1)
        with pytest.raises(NoCheckpointError, match="step 9"):
            c.restore(abstract(states[1]), step=9)
        with pytest.raises(ValueError, match="without a sharding"):
            c.restore(jax.eval_shape(lambda: states[1]))


def test_changed_model_is_refused_not_skipped(tmp_path, caplog):
    save_steps(tmp_path, [1, 2])
    with Checkpointer(tmp_path, read_only=True) as c, \
            pytest.raises(CheckpointError, match="does not match") as info:
        c.restore(abstract(make_state(width=128)))
    assert "params/dense/w" in str(info.value) and "step 2" in str(info.value)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING
                and r.name == "mmjax.checkpoint"]


# --- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_state_is_never_saved(tmp_path, bad):
    state = make_state()
    state = state.replace(params={**state.params, "embed": {
        "table": state.params["embed"]["table"].at[3, 4].set(bad)}})
    with Checkpointer(tmp_path) as c:
        with pytest.raises(NonFiniteStateError, match="params/embed/table"):
            c.save(1, state, config={}, data_state={})
    assert not {e for e in entries(tmp_path) if e[0].isdigit()}


def test_read_only_changes_nothing(tmp_path):
    def snapshot(path):
        return {str(p): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
                for p in [path, *path.rglob("*")]}

    states = save_steps(tmp_path, [1, 2])
    (tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp").mkdir()  # a writer would delete it
    empty_directory(tmp_path / "checkpoints" / "2")  # a writer would move it aside
    before = snapshot(tmp_path)
    with Checkpointer(tmp_path, read_only=True) as c:
        assert c.restore(abstract(states[1])).step == 1
        assert c.restore_config(step=1) == {"model": "tiny", "lr": 1e-3}
        with pytest.raises(CheckpointError, match="read-only"):
            c.save(5, states[1], config={}, data_state={})
    restore_numpy(tmp_path)
    assert snapshot(tmp_path) == before

    missing = tmp_path / "never-created"
    with Checkpointer(missing, read_only=True) as c, pytest.raises(NoCheckpointError):
        c.restore(abstract(states[1]))
    assert not missing.exists()


def test_no_checkpoint_names_the_directory(tmp_path):
    with Checkpointer(tmp_path) as c:
        assert c.latest_step() is None and c.all_steps() == []
        with pytest.raises(NoCheckpointError, match=str(tmp_path / "checkpoints")):
            c.restore(abstract(make_state()))
        with pytest.raises(NoCheckpointError, match=str(tmp_path / "checkpoints")):
            c.restore_config()
    with pytest.raises(NoCheckpointError, match=str(tmp_path / "elsewhere")):
        restore_numpy(tmp_path / "elsewhere")
