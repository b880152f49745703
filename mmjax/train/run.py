"""What `train.py` does after parsing flags: join a multi-host job, train, turn failures into
clear messages and exit codes (0 done or preempted-and-saved, 1 failed, 2 bad setup)."""

from __future__ import annotations

import logging
import sys

import jax

from mmjax.checkpoint import CheckpointError, state_fingerprint
from mmjax.train.loop import NonFiniteLossError, ResumeMismatchError, _oom_advice, train

log = logging.getLogger("mmjax.train")


def init_distributed(args) -> None:
    """Joins a multi-process job when asked: --coordinator HOST:PORT --num-processes N
    --process-id I, or --distributed to take all three from what `jax.distributed.initialize`
    detects (SLURM, Open MPI, Cloud TPU pod slices, Kubernetes with `jax[k8s]`). A flag left
    out next to --coordinator is detected the same way."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if not (args.distributed or any(v is not None for v in explicit)):
        return
    kwargs = {}
    if any(v is not None for v in explicit):
        kwargs = dict(coordinator_address=args.coordinator, num_processes=args.num_processes,
                      process_id=args.process_id)
    jax.distributed.initialize(**kwargs)
    # Every process logs to its own stderr; the prefix tells their lines apart where a
    # launcher (srun, kubectl logs) merges them. Metrics, previews and TensorBoard come from
    # process 0 only.
    prefix = f"[process {jax.process_index()}/{jax.process_count()}] "
    for handler in logging.getLogger().handlers:
        fmt = getattr(handler.formatter, "_fmt", None) or "%(levelname)s %(name)s: %(message)s"
        handler.setFormatter(logging.Formatter(prefix + fmt, getattr(handler.formatter, "datefmt", None)))
    log.info("process %d of %d joined", jax.process_index(), jax.process_count())


def main(config, args, make_extra_eval=None) -> int:
    """`make_extra_eval(config)` builds the loop's extra evaluation (after joining the job)."""
    try:
        init_distributed(args)
    except (ValueError, TypeError, RuntimeError) as e:
        print(f"train.py: cannot join the multi-process job: {e}", file=sys.stderr)
        return 2
    try:
        extra_eval = make_extra_eval(config) if make_extra_eval else None
        result = train(config, args.workdir, extra_eval=extra_eval)
    except (ResumeMismatchError, ValueError) as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, CheckpointError, MemoryError) as e:
        print(f"train.py: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except jax.errors.JaxRuntimeError as e:  # out of memory outside the loop (init, restore)
        advice = _oom_advice(e, config)
        if not isinstance(advice, MemoryError):
            raise
        print(f"train.py: MemoryError: {advice}", file=sys.stderr)
        return 1
    # Each process digests its own copy of the state: in a multi-process job the lines of all
    # processes must agree.
    log.info("process %d/%d ends at step %d with state fingerprint %s", jax.process_index(),
             jax.process_count(), result.step, state_fingerprint(result.state))
    state = "stopped (preempted) and saved" if result.stopped_early else "finished"
    summary = ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.eval_metrics.items()))
    print(f"{state} at step {result.step} in {args.workdir}" + (f": {summary}" if summary else ""))
    return 0
