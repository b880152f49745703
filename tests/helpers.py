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
