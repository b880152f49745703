"""Shared helpers for tests: tiny configs and runs."""

from __future__ import annotations

import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(name: str, *overrides: str):
    from mmjax.config import load_config

    return load_config(os.path.join(REPO, "configs", f"{name}.py:tiny"),
                       ["train.progress=False", *overrides])


def read_metrics(workdir: str) -> dict[int, dict]:
    """Per-step rows of metrics.jsonl (the last row written for a step wins)."""
    rows = {}
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row:
                rows[row["step"]] = row
    return rows
