"""Train an mmjax model.

    python train.py                                              # default config -> runs/default
    python train.py --config configs/vae_shapes.py:tiny --workdir runs/vae --config.optim.lr=1e-3
    python train.py ... -v                                       # also JAX/Orbax/Grain INFO lines

A workdir with checkpoints is resumed. SIGTERM (preemption) saves at the next step boundary and
exits 0. Multi-host: run it on every host with --coordinator HOST:PORT --num-processes N
--process-id I, or with --distributed where jax detects the job (SLURM, Open MPI, TPU pod
slices, Kubernetes with jax[k8s]); the workdir must be one shared directory.
Exit codes: 0 finished or preempted-and-saved, 1 failed, 2 bad setup.
"""

import argparse
import os
import sys

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "vae_shapes.py")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="path/to/config.py[:variant]")
    parser.add_argument("--workdir", default="runs/default")
    parser.add_argument("--coordinator", help="host:port of process 0 (multi-host)")
    parser.add_argument("--num-processes", type=int, help="processes in the job (multi-host)")
    parser.add_argument("--process-id", type=int, help="this process's index, 0 to N-1 (multi-host)")
    parser.add_argument("--distributed", action="store_true",
                        help="join the job jax.distributed.initialize() detects (SLURM, TPU pods, ...)")
    from mmjax import logs

    logs.add_verbose_flag(parser)
    args, extra = parser.parse_known_args(argv)
    logs.setup_logging(args.verbose)

    from mmjax import config as config_lib

    try:
        config = config_lib.load_config(args.config, config_lib.split_override_args(extra))
    except config_lib.ConfigError as e:
        print(f"train.py: config error: {e}", file=sys.stderr)
        return 2

    from mmjax.evaluate import in_loop_generation
    from mmjax.train import run

    return run.main(config, args, make_extra_eval=in_loop_generation)


if __name__ == "__main__":
    sys.exit(main())
