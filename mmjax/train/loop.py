"""The training loop: set up, resume, step, log, evaluate, preview, checkpoint.

Host work stays out of the hot path: the step is dispatched asynchronously and its metrics are
fetched in bulk every `log_every` steps (and before every save, so that no checkpoint is
written past an unnoticed non-finite loss).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import signal
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache
from tqdm import tqdm

from mmjax import sharding, zoo
from mmjax.checkpoint import Checkpointer
from mmjax.data import pipeline
from mmjax.data import tokenizer as tokenizers
from mmjax.data.tokenizer import ABSENT_TEXT
from mmjax.images import make_grid, to_uint8
from mmjax.train.state import TrainState, create_state, make_optimizers
from mmjax.train.step import make_train_step
from mmjax.train.writer import MetricWriter

log = logging.getLogger("mmjax.train")

# Settings that change what a checkpoint means: resuming across a change of these is refused.
RESUME_KEYS = ("family", "variant", "model", "dtype", "data.name", "data.path", "data.image_size",
               "data.max_len", "data.seed", "data.captions", "train.seed", "train.batch_size",
               "text.tokenizer", "text.normalize", "text.positions", "text.vocab_size")
# What a key absent from a checkpoint's config meant: it was saved before the key existed.
RESUME_ABSENT = {"data.captions": "templates",  # see shapes.caption_style
                 **{f"text.{k}": v for k, v in ABSENT_TEXT.items()}}


class NonFiniteLossError(RuntimeError):
    pass


class ResumeMismatchError(ValueError):
    pass


@dataclasses.dataclass
class RunResult:
    state: TrainState
    step: int
    last_metrics: dict
    eval_metrics: dict
    trace_count: int
    stopped_early: bool


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return "<absent>"
        tree = tree[part]
    return tree


def check_resume_compatible(saved: dict, current: dict) -> None:
    diffs = []
    for key in RESUME_KEYS:
        old, new = (RESUME_ABSENT.get(key, v) if v == "<absent>" else v
                    for v in (_lookup(saved, key), _lookup(current, key)))
        if json.dumps(old, sort_keys=True) != json.dumps(new, sort_keys=True):
            diffs.append(f"  {key}: checkpoint has {old!r}, config has {new!r}")
    if diffs:
        raise ResumeMismatchError(
            "refusing to resume: the workdir's checkpoint was trained with a different setup:\n"
            + "\n".join(diffs)
            + "\nUse a new --workdir, or restore the original settings."
        )


class TrainClock:
    """Seconds spent training, so that the images/s a user sees is the training rate.

    Evaluation, previews, checkpoints, metric writing and the first step's compile run inside
    `paused()`. The device runs behind the host, so the loop waits for the steps in flight
    before it pauses the clock or reads a lap: their time counts as training.
    """

    def __init__(self, now=time.perf_counter):
        self._now = now
        self._since = now()  # when the clock last started running
        self._banked = 0.0  # training seconds since the last lap, up to `_since`
        self._depth = 0  # nested pauses (a save pauses, and so does the flush inside it)

    def lap(self) -> float:
        """Training seconds since the previous lap (or since the clock was made)."""
        now = self._now()
        seconds = self._banked + (now - self._since if self._depth == 0 else 0.0)
        self._banked, self._since = 0.0, now
        return seconds

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside is not training; yields a `Span` whose `seconds` is set on exit."""
        start = self._now()
        if self._depth == 0:
            self._banked += start - self._since
        self._depth += 1
        span = Span()
        try:
            yield span
        finally:
            end = self._now()
            span.seconds = end - start
            self._depth -= 1
            if self._depth == 0:
                self._since = end


@dataclasses.dataclass
class Span:
    seconds: float = 0.0


def setup_compilation_cache(config, workdir: str) -> str | None:
    """Points JAX's persistent compilation cache where `train.compilation_cache` says.

    JAX opens its cache once per process, at the first compile, and ignores later changes of
    directory. A second run in the same process (a notebook, a test session) would keep using
    the first run's cache, or keep caching when told "off", so a change resets it.
    """
    setting = config.train.compilation_cache
    path = None if setting == "off" else (
        setting or os.path.join(os.path.dirname(os.path.abspath(workdir)), ".jax_cache"))
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        compilation_cache.reset_cache()
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


class _StopFlag:
    """SIGTERM (preemption) sets a flag; the loop saves at the next step boundary and exits.

    With several processes the signal may reach only some of them, or each at another step,
    yet all must stop at the same step: a process that saved and left would leave the others
    waiting forever in the next step's collectives. So every `SYNC_EVERY` steps they
    all-gather their flags (a tiny collective, which also waits for the steps in flight) and
    stop together when any is set. One process checks its own flag at every step.
    """

    SYNC_EVERY = 10

    def __init__(self):
        self.requested = False
        self._installed = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving at the next step boundary, then exiting")
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.requested
        if step % self.SYNC_EVERY:
            return False
        flags = np.asarray(multihost_utils.process_allgather(np.int32(self.requested)))
        if flags.any():
            log.warning("all processes stop at step %d (SIGTERM reached process %s)",
                        step, ", ".join(str(i) for i in np.flatnonzero(flags)))
        return bool(flags.any())

    def __exit__(self, *exc):
        # A handler installed outside Python (jax.distributed's preemption notifier) reads
        # back as None and cannot be reinstated: fall back to the default.
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)


def _oom_advice(error: Exception, config=None) -> Exception:
    """Turns XLA's out-of-memory error into a MemoryError that says what to change."""
    if "RESOURCE_EXHAUSTED" not in str(error) and "Out of memory" not in str(error):
        return error
    now = {}
    if config is not None:
        per_device = config.train.batch_size // max(1, jax.device_count() * config.train.grad_accum)
        now = {"batch": f" (now {config.train.batch_size}: microbatches of {per_device} per device)",
               "accum": f" (now {config.train.grad_accum}; e.g. --config.train.grad_accum="
                        f"{2 * config.train.grad_accum})",
               "dtype": f" (now {config.dtype})"}
    return MemoryError(
        "out of device memory. Use less memory per device: reduce --config.train.batch_size"
        f"{now.get('batch', '')}, or raise --config.train.grad_accum{now.get('accum', '')}, which "
        "keeps the global batch and splits it into smaller microbatches, or compute in "
        f"--config.dtype=bfloat16{now.get('dtype', '')}. Also check that no other process holds "
        "device memory (JAX preallocates 75% of a GPU per process; see "
        f"XLA_PYTHON_CLIENT_MEM_FRACTION). Original error: {str(error)[:500]}"
    )


def train(config, workdir: str, *, stop_at: int | None = None, extra_eval=None) -> RunResult:
    """Trains `config` in `workdir`, resuming from its latest good checkpoint if there is one.

    `stop_at` ends the run early at that step (with a checkpoint), as a preemption would.
    `extra_eval(ema_params) -> {name: float}` runs at every evaluation beside the family's own
    (train.py passes `mmjax.evaluate.in_loop_generation`); its numbers are logged as `eval/`.
    """
    family = zoo.FAMILIES[config.family]
    mesh = sharding.make_mesh()
    sharding.check_batch_divisible(config.train.batch_size, mesh,
                                   per_device_multiple=config.train.grad_accum)
    setup_compilation_cache(config, workdir)
    is_main = jax.process_index() == 0

    model = zoo.build_model(config)
    objectives = family.objectives(model, config)
    optimizers, schedules = make_optimizers(objectives, config)
    init_fn = functools.partial(create_state, family, model, config, optimizers, objectives)
    replicated = sharding.replicated(mesh)
    abstract = jax.eval_shape(init_fn)
    # Replicated (data parallel) or fsdp; a checkpoint restores into either, on any mesh size.
    state_shardings = sharding.state_shardings(abstract, mesh, config.train.param_sharding)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract,
                          state_shardings)
    config_dict = json.loads(config.to_json())

    # Built before anything is written: a dataset with too many bad images stops the run here,
    # without leaving a workdir behind.
    train_source = pipeline.make_source(config.data, "train")
    tokenizer = run_tokenizer(config, workdir)

    best = family.best_metric
    writer = MetricWriter(workdir, enabled=is_main)
    # The stop flag outlives the checkpointer: a SIGTERM while close() waits for the last
    # save must not kill the process mid-write.
    with _StopFlag() as stop, Checkpointer(
            workdir, keep_latest=config.train.keep_latest, keep_best=config.train.keep_best,
            best_metric=f"eval/{best[0]}" if best else None, best_mode=best[1] if best else "max") as ckpt:
        if ckpt.latest_step() is not None:
            check_resume_compatible(ckpt.restore_config(), config_dict)
            restored = ckpt.restore(target)
            state, start = restored.state, int(restored.step)
            start_batch = int(restored.data_state["next_batch"])
            log.info("resumed from step %d in %s", start, workdir)
        else:
            state = jax.jit(init_fn, out_shardings=state_shardings)()
            if family.prepare is not None:
                state = _prepare(family, state, config, state_shardings, tokenizer)
            start, start_batch = 0, 0
        if is_main:
            with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
                f.write(config.to_json(indent=2))
            if tokenizer.kind == "word":
                tokenizer.save(workdir)

        train_batches = pipeline.make_batches(
            train_source, global_batch=config.train.batch_size,
            tokenizer=tokenizer, seed=config.data.seed,
            process_index=jax.process_index(), process_count=jax.process_count(),
            start_batch=start_batch, worker_count=config.data.worker_count,
            augment=config.data.augment)
        eval_batches = _eval_batches(config, mesh, tokenizer)

        step_fn = make_train_step(objectives, optimizers, schedules,
                                  ema_decay=config.train.ema_decay, grad_accum=config.train.grad_accum)
        jitted_step = jax.jit(step_fn, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                              out_shardings=(state_shardings, replicated), donate_argnums=0)
        evaluate = (jax.jit(functools.partial(family.evaluate, model, config=config))
                    if family.evaluate else None)
        preview = (jax.jit(functools.partial(family.preview, model, config=config))
                   if family.preview else None)

        end = config.train.num_steps if stop_at is None else min(stop_at, config.train.num_steps)
        # No tqdm rate: its steps/s counts evaluation and saving; img_s in the postfix does not.
        bar = tqdm(total=config.train.num_steps, initial=start, disable=not (is_main and config.train.progress),
                   dynamic_ncols=True, desc="train", bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
                   "[{elapsed}<{remaining}{postfix}]")
        pending: list[tuple[int, dict]] = []
        nonfinite_steps: list[int] = []
        last_metrics, eval_metrics = {}, {}
        clock, window_steps = TrainClock(), 0  # steps since the last flush, not counting the first
        first_calls = {"eval", "preview", "save"}  # jitted on first use: that line says it compiled

        def report(at: int, what: str, span: Span, first_call_of: str = ""):
            """A line above the progress bar for host work outside training, with its time."""
            compiled = first_call_of in first_calls
            first_calls.discard(first_call_of)
            if is_main:
                log.info("step %d: %s (%.1f s%s)", at, what, span.seconds, ", compiling included" if compiled else "")

        def flush_metrics():
            nonlocal last_metrics, window_steps
            if not pending:
                return
            host = jax.device_get([m for _, m in pending])  # waits for the steps in flight
            seconds = clock.lap()
            with clock.paused():
                last_metrics = dict(host[-1])
                postfix = {"loss": f"{float(np.mean([h['loss'] for h in host if 'loss' in h] or [0])):.4f}"}
                if window_steps:
                    last_metrics["images_per_sec"] = window_steps * config.train.batch_size / max(seconds, 1e-9)
                    postfix["img_s"] = f"{last_metrics['images_per_sec']:.0f}"
                for (at, _), values in zip(pending, host):
                    if values["nonfinite"]:
                        nonfinite_steps.append(at)
                    writer.write(at, values, tensorboard=False)
                writer.write(pending[-1][0], {"train/" + k: v for k, v in last_metrics.items()})
                writer.flush()
                bar.set_postfix(postfix)
            pending.clear()
            window_steps = 0
            if len(nonfinite_steps) > config.train.max_nonfinite:
                raise NonFiniteLossError(
                    f"non-finite loss or gradients at {len(nonfinite_steps)} step(s), steps "
                    f"{nonfinite_steps[0]}..{nonfinite_steps[-1]} (updates at those steps were skipped; "
                    f"no checkpoint holds them). Lower --config.optim.lr or check the data.")

        def save(at: int, force: bool = False):
            flush_metrics()
            with clock.paused() as span:
                saved = ckpt.save(at, state, config=config_dict, metrics=eval_metrics or None, force=force,
                                  data_state=train_batches.get_state() | {"next_batch": at})
            if saved:
                report(at, "saved checkpoint", span, "save")

        step = start
        stopped_early = False
        try:
            while step < end:
                local_batch = next(train_batches)
                if step == start:
                    _log_data_shard(local_batch, start_batch)
                batch = sharding.to_device(local_batch, mesh)
                state, metrics = jitted_step(state, batch)
                step += 1
                pending.append((step, metrics))
                if step == start + 1:
                    # The first step compiles (or loads from the cache): timed alone, kept out
                    # of the rate. One wait for the device, once per run.
                    jax.block_until_ready(metrics)
                    seconds = clock.lap()
                    if is_main:
                        log.info("step %d: compiled the train step and ran it (%.1f s)", step, seconds)
                else:
                    window_steps += 1
                bar.update(1)
                if step % config.train.log_every == 0:
                    flush_metrics()
                if (evaluate or extra_eval) and config.train.eval_every and (
                        step % config.train.eval_every == 0 or step == end):
                    jax.block_until_ready(metrics)  # the steps in flight are training time
                    with clock.paused() as span:
                        eval_metrics = _run_eval(evaluate, state.ema_params, eval_batches) if evaluate else {}
                        if extra_eval:
                            eval_metrics.update(
                                {f"eval/{k}": float(v) for k, v in extra_eval(state.ema_params).items()})
                        writer.write(step, eval_metrics)
                        writer.flush()
                    report(step, "eval " + _format_metrics(eval_metrics), span, "eval")
                if preview and config.train.sample_every and (
                        step % config.train.sample_every == 0 or step == end):
                    jax.block_until_ready(metrics)
                    with clock.paused() as span:
                        path = _write_preview(writer, preview, state.ema_params, eval_batches[0], config, step)
                    report(step, f"preview {path}", span, "preview")
                if stop.should_stop(step):
                    stopped_early = True
                    break
                if step % config.train.checkpoint_every == 0 and step < end:
                    save(step)
            if step > start or ckpt.latest_step() is None:
                save(step, force=True)
            stopped_early = stopped_early or step < config.train.num_steps
        except jax.errors.JaxRuntimeError as e:
            raise _oom_advice(e, config) from e
        finally:
            train_batches.close()  # stops grain's worker processes now, not at interpreter exit
            bar.close()
            writer.close()
    return RunResult(state=state, step=step, last_metrics=last_metrics, eval_metrics=eval_metrics,
                     trace_count=step_fn.trace_count[0], stopped_early=stopped_early)


def run_tokenizer(config, workdir: str):
    """The run's tokenizer. A word vocabulary is built from the train captions (the same on
    every host, for the same config) and saved in the workdir; a resumed run checks that the
    vocabulary saved there is the one it builds."""
    tokenizer = tokenizers.for_config(config)
    saved_path = os.path.join(workdir, tokenizers.TOKENIZER_FILE)
    if tokenizer.kind == "word" and os.path.exists(saved_path):
        if tokenizers.WordTokenizer.load(workdir, config.data.max_len) != tokenizer:
            raise ResumeMismatchError(
                f"refusing to resume: {saved_path} is not the vocabulary this config's train captions "
                "build (the data or text settings changed). Use a new --workdir, or restore the "
                "original settings.")
    return tokenizer


def _prepare(family, state: TrainState, config, shardings: TrainState, tokenizer) -> TrainState:
    """The family's fresh-start hook (e.g. loading a frozen VAE). Every process reads the same
    batches (process 0's view of an unshuffled epoch), so all compute identical parameters."""
    batches = pipeline.make_batches(
        pipeline.make_source(config.data, "train"), global_batch=config.train.batch_size,
        tokenizer=tokenizer, seed=config.data.seed, process_index=0, process_count=1,
        shuffle=False, num_epochs=1)
    params = jax.device_put(family.prepare(jax.device_get(state.params), config, iter(batches)), shardings.params)
    # A copy, not the same buffers: the step donates the state, and a buffer donated twice is freed
    # under the other reference.
    return state.replace(params=params, ema_params=jax.tree.map(lambda x: x.copy(), params))


def _eval_batches(config, mesh, tokenizer) -> list[dict]:
    """A fixed set of test batches, placed on devices once and reused at every evaluation."""
    batches = pipeline.make_batches(
        pipeline.make_source(config.data, "test"), global_batch=config.train.batch_size,
        tokenizer=tokenizer, seed=config.data.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), shuffle=False, num_epochs=1)
    out = []
    for local in batches:
        out.append(sharding.to_device(local, mesh))
        if len(out) >= max(1, config.train.eval_batches):
            break
    if not out:
        raise ValueError("the test split is smaller than one batch; lower train.batch_size or raise data.num_test")
    return out


def _format_metrics(metrics: dict) -> str:
    return " ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in sorted(metrics.items()))


def _run_eval(evaluate, params, batches) -> dict:
    results = jax.device_get([evaluate(params, b) for b in batches])
    return {f"eval/{k}": float(np.mean([r[k] for r in results])) for k in results[0]}


def _to_host(x) -> np.ndarray:
    """The whole of a global array as numpy; a collective where other processes hold parts."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _log_data_shard(local_batch: dict, first_batch: int) -> None:
    """One line per process naming the examples it reads first (a short digest of each), so
    that the shards of a multi-process run can be compared from the logs."""
    arrays = [a for a in (np.asarray(local_batch[k]) for k in sorted(local_batch)) if a.dtype != object]
    size = len(arrays[0])
    digests = [hashlib.blake2b(b"".join(a[i].tobytes() for a in arrays), digest_size=4).hexdigest()
               for i in range(min(size, 64))]
    log.info("data shard of process %d/%d: batch %d holds %d examples: %s%s", jax.process_index(),
             jax.process_count(), first_batch, size, " ".join(digests), " ..." if size > 64 else "")


def _write_preview(writer, preview, params, batch, config, step: int) -> str | None:
    """Writes the preview grid; returns its path (None where this process does not write)."""
    # Every process computes (the batch spans them all); only process 0's writer writes.
    images = to_uint8(_to_host(preview(params, batch, jax.random.key(config.train.seed + 1))))
    tokens = _to_host(batch["tokens"])
    if not writer.enabled:
        return None
    captions = tokenizers.for_config(config).decode(tokens)
    # A preview may hold several images per example (input, reconstruction, sample), in that
    # order for each of its first `sample.num` examples: repeat each caption to match.
    per = max(1, len(images) // max(1, min(len(captions), config.sample.num)))
    captions = [c for c in captions[: len(images) // per] for _ in range(per)]
    grid = make_grid(images, captions=captions if len(captions) == len(images) else None,
                     ncols=min(8, len(images)))
    return writer.write_image(step, "preview", np.asarray(grid))
