"""What `train.py` does after parsing flags: join a multi-host job, train, turn failures into
clear messages and exit codes (0 done or preempted-and-saved, 1 failed, 2 bad setup)."""

from __future__ import annotations

import logging
import sys

import jax

from mmjax.checkpoint import CheckpointError
from mmjax.train.loop import NonFiniteLossError, ResumeMismatchError, train

log = logging.getLogger("mmjax.train")


def init_distributed(args) -> None:
    if args.coordinator or args.num_processes or args.distributed:
        kwargs = {}
        if args.coordinator:
            kwargs = dict(coordinator_address=args.coordinator, num_processes=args.num_processes,
                          process_id=args.process_id)
        jax.distributed.initialize(**kwargs)
        log.info("process %d of %d joined", jax.process_index(), jax.process_count())


def main(config, args, make_extra_eval=None) -> int:
    """`make_extra_eval(config)` builds the loop's extra evaluation (after joining the job)."""
    init_distributed(args)
    try:
        extra_eval = make_extra_eval(config) if make_extra_eval else None
        result = train(config, args.workdir, extra_eval=extra_eval)
    except (ResumeMismatchError, ValueError) as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, CheckpointError, MemoryError) as e:
        print(f"train.py: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    state = "stopped (preempted) and saved" if result.stopped_early else "finished"
    summary = ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.eval_metrics.items()))
    print(f"{state} at step {result.step} in {args.workdir}" + (f": {summary}" if summary else ""))
    return 0
