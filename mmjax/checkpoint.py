"""Checkpoints: one Orbax CheckpointManager under `<workdir>/checkpoints`.

Each step directory holds four named items: `state` (a pytree of arrays, restored into an
abstract target that carries the current mesh's shardings), `config` and `data` (JSON), and
`integrity` (JSON: a fingerprint of every state leaf). Orbax checks none of its files on
restore: a truncated file fails, but overwritten bytes in an array file restore silently as
wrong values. The fingerprint, computed on device before the save and recomputed after a
restore, turns that into a detected failure. A step that fails to restore (any reason) is
skipped with a warning and the previous one is tried.

    with Checkpointer(workdir, best_metric="acc") as ckpt:
        restored = ckpt.restore(abstract_state)   # NoCheckpointError on a fresh workdir
        ...
        ckpt.save(step, state, config=config.to_dict(), data_state={"next_batch": k},
                  metrics={"acc": acc})
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import pathlib
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, BestN, LatestN

log = logging.getLogger(__name__)

STATE, CONFIG, DATA, INTEGRITY = "state", "config", "data", "integrity"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read."""


class NoCheckpointError(CheckpointError):
    """The workdir holds no finished checkpoint (a fresh run starts from scratch)."""


class NonFiniteStateError(CheckpointError, ValueError):
    """The state to save holds NaN or Inf; saving it would poison every later resume."""


class _DamagedStepError(CheckpointError):
    """A finished step whose contents do not match what was saved."""


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    state: Any
    config: dict
    data_state: dict


# ---------------------------------------------------------------------------------------------
# Leaf fingerprints. Integer arithmetic modulo 2**32 is exact and order-free, so the sum below
# gives the same bits whatever the sharding, device count or backend (jax on device, numpy on
# host). murmur3's finaliser makes one flipped input bit change about half the output bits;
# mixing in the element's index catches swapped or shifted chunks. Not cryptographic: it
# guards against damage, not an adversary.

_SEEDS = (np.uint32(0x9E3779B9), np.uint32(0x7F4A7C15))


def _fmix32(h):
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _as_words(x, xp):
    """The leaf's bits as uint32 arrays of the leaf's shape (two for 64-bit dtypes)."""
    dtype = np.dtype(x.dtype)
    if dtype == np.bool_:
        return [x.astype(np.uint32)]
    numeric = jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)
    if not numeric or dtype.itemsize not in (1, 2, 4, 8):  # bfloat16's numpy kind is "V"
        raise TypeError(f"cannot fingerprint a leaf of dtype {dtype}")
    uint = np.dtype(f"uint{dtype.itemsize * 8}")
    bits = jax.lax.bitcast_convert_type(x, uint) if xp is jnp else x.view(uint)
    if dtype.itemsize < 8:
        return [bits.astype(np.uint32)]
    return [(bits & np.uint64(0xFFFFFFFF)).astype(np.uint32),
            (bits >> np.uint64(32)).astype(np.uint32)]


def _fingerprint(x, xp):
    # numpy warns on 0-d (scalar) overflow but not on arrays, hence the reshape there.
    shape = x.shape if xp is jnp else (x.size,)
    words = [w.reshape(shape) for w in _as_words(x, xp)]
    index = xp.arange(x.size, dtype=np.uint32).reshape(shape)
    lanes = []
    for seed in _SEEDS:
        sums = [xp.sum(_fmix32(word ^ _fmix32(index ^ (seed + np.uint32(j)))), dtype=np.uint32)
                for j, word in enumerate(words)]
        lanes.append(xp.sum(xp.stack(sums), dtype=np.uint32))
    return xp.stack(lanes)


@jax.jit
def _inspect_on_device(state):
    """Per leaf: all finite (True for non-float leaves) and its fingerprint. One transfer."""
    leaves = jax.tree.leaves(state)
    finite = [jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
              else jnp.array(True) for x in leaves]
    return finite, [_fingerprint(x, jnp) for x in leaves]


def state_fingerprint(state) -> str:
    """A short digest of every leaf's bits, computed where the leaves are (no host copy).

    Equal for two states only when they are bitwise equal, whatever their sharding. In a
    multi-process job each process digests its own replica: processes that drifted apart
    show different digests.
    """
    _, fingerprints = jax.device_get(_inspect_on_device(state))
    return hashlib.blake2b(b"".join(np.asarray(f).tobytes() for f in fingerprints),
                           digest_size=8).hexdigest()


def _paths(tree) -> list[str]:
    # `simple` paths read the same for a dataclass field, a dict key or a list index, so a
    # state saved as a flax struct matches the nested dicts restore_numpy gives back.
    return [jax.tree_util.keystr(p, simple=True, separator="/")
            for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _digests_json(paths, fingerprints) -> dict:
    return {path: "%08x%08x" % tuple(int(v) for v in np.asarray(fp))
            for path, fp in zip(paths, fingerprints)}


def _verify_digests(state, saved: dict, on_device: bool) -> None:
    paths = _paths(state)
    if on_device:
        _, fingerprints = jax.device_get(_inspect_on_device(state))
    else:
        fingerprints = [_fingerprint(np.asarray(x), np) for x in jax.tree.leaves(state)]
    actual = _digests_json(paths, fingerprints)
    expected = saved.get("leaves", {})
    if set(actual) != set(expected):
        raise _DamagedStepError(f"integrity record lists leaves {sorted(expected)}, "
                                f"restored state has {sorted(actual)}")
    bad = [p for p in paths if actual[p] != expected[p]]
    if bad:
        raise _DamagedStepError(f"leaf contents differ from what was saved: {', '.join(bad)}")


# ---------------------------------------------------------------------------------------------


def _stored_form(state):
    """What Orbax stores for `state`: a dataclass (the TrainState) becomes a dict of its fields
    without those that are None. An optional field (`model_state`, which only some families
    use) then adds nothing to other checkpoints, and checkpoints written before a field
    existed still restore. Leaf paths read the same either way (see `_paths`)."""
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        values = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
        return {name: value for name, value in values.items() if value is not None}
    return state


def _from_stored(target, stored):
    """Rebuilds the target's structure (e.g. the TrainState) around a restored stored form."""
    if dataclasses.is_dataclass(target) and not isinstance(target, type):
        return dataclasses.replace(target, **{f.name: stored.get(f.name) for f in dataclasses.fields(target)})
    return stored


def _leaf_specs(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    return {path: (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
            for path, leaf in zip(_paths(tree), jax.tree.leaves(tree))}


def _check_target(saved_tree, abstract_state, step: int, root) -> None:
    """A checkpoint of another model is not damage: refuse at once, never fall back past it."""
    saved, wanted = _leaf_specs(saved_tree), _leaf_specs(abstract_state)
    problems = [f"{p}: missing in checkpoint" for p in wanted if p not in saved]
    problems += [f"{p}: in checkpoint but not in target" for p in saved if p not in wanted]
    problems += [f"{p}: checkpoint {saved[p]} vs target {wanted[p]}"
                 for p in wanted if p in saved and saved[p] != wanted[p]]
    if problems:
        raise CheckpointError(
            f"checkpoint step {step} in {root} does not match the state to restore into "
            f"(changed model or config?):\n  " + "\n  ".join(problems[:20]))


def _state_metadata(manager, step: int):
    meta = manager.item_metadata(step)[STATE]
    # With a target, Orbax restores fine without the tree metadata, but restore_numpy and
    # the target check need it: a step without it is damaged.
    if meta is None:
        raise _DamagedStepError("state metadata is missing")
    return meta.tree


def _restore_latest_good(manager, root, load_step, step):
    """Returns (load_step's result, damaged newer steps): for `step`, or the newest that loads."""
    manager.reload()  # see steps written by another process (e.g. sampling while training)
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise NoCheckpointError(f"no finished checkpoint in {root}")
    if step is not None and step not in steps:
        raise NoCheckpointError(f"no checkpoint for step {step} in {root}; found {steps}")
    failures = []
    for candidate in steps if step is None else [step]:
        try:
            return load_step(candidate), [s for s, _ in failures]
        # A truncated or missing file surfaces as many error types; all mean "damaged".
        except Exception as e:
            if isinstance(e, CheckpointError) and not isinstance(e, _DamagedStepError):
                raise  # e.g. another model's checkpoint: older steps would not match either
            if step is not None:
                raise CheckpointError(f"checkpoint step {step} in {root} is damaged: "
                                      f"{type(e).__name__}: {e}") from e
            log.warning("checkpoint step %d in %s cannot be restored, trying an older step: "
                        "%s: %s", candidate, root, type(e).__name__, e)
            failures.append((candidate, e))
    listing = "\n  ".join(f"step {s}: {type(e).__name__}: {e}" for s, e in failures)
    raise CheckpointError(f"every checkpoint in {root} is damaged:\n  {listing}")


def _items_handlers(state_handler):
    return {STATE: state_handler, CONFIG: ocp.JsonCheckpointHandler(),
            DATA: ocp.JsonCheckpointHandler(), INTEGRITY: ocp.JsonCheckpointHandler()}


def _metric_getter(name: str, mode: str):
    worst = -math.inf if mode == "max" else math.inf

    def get(metrics: dict) -> float:  # a missing or NaN score must never rank best
        value = metrics.get(name)
        return value if isinstance(value, (int, float)) and math.isfinite(value) else worst

    return get


class Checkpointer:
    """Saves and restores train state, config and data-iterator state; a context manager.

    Retention keeps the `keep_latest` newest steps and, when `best_metric` is given, also the
    `keep_best` best by that metric: two separate Orbax preservation policies, so a good old
    step never evicts the newest ones (the legacy `best_fn` + `max_to_keep` did).
    """

    def __init__(self, workdir, *, keep_latest: int = 3, keep_best: int = 1,
                 best_metric: str | None = None, best_mode: str = "max",
                 save_async: bool = True, read_only: bool = False):
        if keep_latest < 1:
            raise ValueError(f"keep_latest must be at least 1, got {keep_latest}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        self._read_only = read_only
        self._best_metric = best_metric
        self._pending_step: int | None = None
        self._closed = False
        policies = [LatestN(n=keep_latest)]
        best_fn = None
        if best_metric is not None and keep_best > 0:
            best_fn = _metric_getter(best_metric, best_mode)
            # BestN sorts ascending and keeps the tail; steps saved without metrics must not
            # be kept forever.
            policies.append(BestN(get_metric_fn=best_fn, reverse=best_mode == "min",
                                  n=keep_best, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            # best_fn is set only so that Orbax writes each step's metrics to disk (it skips
            # them otherwise) and BestN still knows the old steps' scores after a restart;
            # preservation_policy overrides best_fn's own retention.
            best_fn=best_fn,
            best_mode=best_mode,
            preservation_policy=AnyPreservationPolicy(policies),
            enable_async_checkpointing=save_async,
            read_only=read_only,
            create=not read_only,
            # A step killed mid-save leaves `<step>.orbax-checkpoint-tmp-*`; Orbax never lists
            # it as a step, and a writer deletes it so it does not fill the disk.
            cleanup_tmp_directories=not read_only,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, item_handlers=_items_handlers(ocp.StandardCheckpointHandler()),
            options=options)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def save(self, step: int, state, *, config: dict, data_state: dict,
             metrics: dict | None = None, force: bool = False) -> bool:
        """Starts saving `state` at `step`; returns False where Orbax skips the step.

        Orbax skips a step at or below the latest saved one (unless `force`, which then
        raises for an existing step). Returns once the arrays are copied off the devices, so
        the caller may donate them; the write finishes in the background.
        """
        if self._read_only:
            raise CheckpointError(f"{self.directory} was opened read-only")
        self.wait()  # a failed earlier save surfaces here, before anything new is written
        step = int(step)
        if not force and not self._manager.should_save(step):
            return False
        for name, value in ((CONFIG, config), (DATA, data_state)):
            try:
                json.dumps(value)
            except TypeError as e:  # fail here, not in the background thread
                raise TypeError(f"checkpoint item {name!r} is not JSON-serialisable: {e}") from e
        finite, fingerprints = jax.device_get(_inspect_on_device(state))
        paths = _paths(state)
        for path, ok in zip(paths, finite):
            if not ok:
                raise NonFiniteStateError(
                    f"refusing to save step {step}: state leaf {path!r} holds NaN or Inf")
        integrity = {"leaves": _digests_json(paths, fingerprints)}
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(**{
                STATE: ocp.args.StandardSave(_stored_form(state)),
                CONFIG: ocp.args.JsonSave(config),
                DATA: ocp.args.JsonSave(data_state),
                INTEGRITY: ocp.args.JsonSave(integrity),
            }),
            metrics=self._orbax_metrics(metrics),
            force=force,
        )
        if saved:
            self._pending_step = step
        return saved

    def _orbax_metrics(self, metrics):
        if self._best_metric is None or not metrics or self._best_metric not in metrics:
            return None
        return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}

    def wait(self) -> None:
        """Blocks until the background save is on disk; raises if it failed."""
        step, self._pending_step = self._pending_step, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(
                f"saving checkpoint step {step} to {self.directory} failed: "
                f"{type(e).__name__}: {e}") from e

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            try:
                self._manager.close()  # Orbax raises a save failure only once, so this is quiet
            finally:
                self._remove_unfinished()

    def _remove_unfinished(self) -> None:
        """A failed save leaves `<step>.orbax-checkpoint-tmp`: never a step, but disk used.
        Orbax deletes it at the next start; a run that ends here leaves none behind."""
        if self._read_only or jax.process_index() != 0 or not self.directory.is_dir():
            return
        for path in self.directory.glob(f"*{ocp.path.step.TMP_DIR_SUFFIX}*"):
            shutil.rmtree(path, ignore_errors=True)
            log.warning("removed %s, left by a save that did not finish", path)

    def latest_step(self) -> int | None:
        """The newest step directory Orbax lists; `restore` decides whether it loads."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore(self, abstract_state, *, step: int | None = None) -> Restored:
        """Restores into `abstract_state` (jax.ShapeDtypeStructs with target shardings).

        With `step=None`, the newest step that loads and verifies; a writer then moves the
        damaged newer steps to `<workdir>/checkpoints.damaged/` so that Orbax, which never
        saves at or below its latest step, does not skip the saves of the resumed run.
        """
        unsharded = [p for p, leaf in zip(_paths(abstract_state), jax.tree.leaves(abstract_state))
                     if getattr(leaf, "sharding", None) is None]
        if unsharded:
            # Orbax would fall back to the saved shardings, which fail on another topology.
            raise ValueError(f"abstract_state leaves without a sharding: {unsharded[:5]}; "
                             "attach the current mesh's shardings (or use restore_numpy)")
        self.wait()

        stored_target = _stored_form(abstract_state)

        def load_step(candidate):
            _check_target(_state_metadata(self._manager, candidate), stored_target,
                          candidate, self.directory)
            out = self._manager.restore(candidate, args=ocp.args.Composite(**{
                STATE: ocp.args.StandardRestore(stored_target),
                CONFIG: ocp.args.JsonRestore(),
                DATA: ocp.args.JsonRestore(),
                INTEGRITY: ocp.args.JsonRestore(),
            }))
            _verify_digests(out[STATE], out[INTEGRITY], on_device=True)
            return Restored(candidate, _from_stored(abstract_state, out[STATE]), out[CONFIG], out[DATA])

        restored, damaged = _restore_latest_good(self._manager, self.directory, load_step, step)
        self._set_aside(damaged)
        return restored

    def _set_aside(self, steps) -> None:
        if self._read_only or not steps:
            return
        if jax.process_index() == 0:
            aside = self.directory.with_name(self.directory.name + ".damaged")
            aside.mkdir(exist_ok=True)
            for step in steps:
                if not (self.directory / str(step)).exists():
                    continue
                target = aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
                shutil.move(self.directory / str(step), target)
                log.warning("moved damaged checkpoint step %d to %s", step, target)
        ocp.multihost.sync_global_processes("mmjax_checkpoint_set_aside")
        self._manager.reload()

    def restore_config(self, step: int | None = None) -> dict:
        """The JSON config of `step` (default: the newest step whose config reads)."""
        def load_step(candidate):
            out = self._manager.restore(candidate, args=ocp.args.Composite(
                **{CONFIG: ocp.args.JsonRestore()}))
            return out[CONFIG]

        self.wait()
        return _restore_latest_good(self._manager, self.directory, load_step, step)[0]


def restore_numpy(workdir, step: int | None = None) -> Restored:
    """Restores the state as numpy arrays on the host, whatever devices saved it.

    For inspection or sampling on another machine; the structure is nested dicts as recorded
    in the checkpoint's metadata. Falls back past damaged steps like `Checkpointer.restore`,
    but never changes the workdir.
    """
    root = pathlib.Path(workdir).absolute() / "checkpoints"
    manager = ocp.CheckpointManager(
        root, item_handlers=_items_handlers(ocp.PyTreeCheckpointHandler()),
        options=ocp.CheckpointManagerOptions(read_only=True, create=False))

    def load_step(candidate):
        tree = _state_metadata(manager, candidate)
        host = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        out = manager.restore(candidate, args=ocp.args.Composite(**{
            STATE: ocp.args.PyTreeRestore(item=tree, restore_args=host),
            CONFIG: ocp.args.JsonRestore(),
            DATA: ocp.args.JsonRestore(),
            INTEGRITY: ocp.args.JsonRestore(),
        }))
        _verify_digests(out[STATE], out[INTEGRITY], on_device=False)
        return Restored(candidate, out[STATE], out[CONFIG], out[DATA])

    try:
        return _restore_latest_good(manager, root, load_step, step)[0]
    finally:
        manager.close()
