"""Shared helpers for tests: tiny configs and runs."""

from __future__ import annotations

import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# conftest.py sets this: one persistent compilation cache for the whole session.
SHARED_CACHE = "MMJAX_TEST_JAX_CACHE"


def tiny_config(name: str, *overrides: str, shared_cache: bool = True):
    """The `:tiny` variant of configs/<name>.py. With `shared_cache` the run compiles into the
    session's cache, so a step another test compiled is a cache hit; without, into the
    default `<workdir>/../.jax_cache`."""
    from mmjax.config import load_config

    cache = [f"train.compilation_cache={os.environ[SHARED_CACHE]}"] if (
        shared_cache and os.environ.get(SHARED_CACHE)) else []
    return load_config(os.path.join(REPO, "configs", f"{name}.py:tiny"),
                       ["train.progress=False", *cache, *overrides])


def read_metrics(workdir: str) -> dict[int, dict]:
    """Per-step rows of metrics.jsonl (the last row written for a step wins)."""
    rows = {}
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row:
                rows[row["step"]] = row
    return rows


def init_family(family, model, batch, config, seed: int = 0):
    """`family.init` as one jitted program with an rbg key: eager init dispatches op by op, and
    the default threefry key costs XLA:CPU ~10 s compiling a tiny model's initialisers (see
    tests/models/jit_helpers.py). For tests that need some parameters, not particular ones."""
    import jax

    return jax.jit(lambda rng, b: family.init(model, rng, b, config))(jax.random.key(seed, impl="rbg"), batch)


def sibling_workdir(workdir: str, name: str) -> str:
    """A new run directory next to `workdir`: a run with the same config there finds its
    steps in the default compilation cache, `<parent>/.jax_cache`, instead of compiling them."""
    import tempfile

    path = tempfile.mkdtemp(prefix=f"{name}-", dir=os.path.dirname(os.path.abspath(workdir)))
    os.rmdir(path)
    return path
