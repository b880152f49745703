"""A trained model on disk, as inference reads it: its config and its EMA weights.

Two layouts hold one: a train.py workdir (Orbax checkpoints; the EMA weights of the newest
good step, or of a chosen one) and an export directory (`config.json`, the weights as one
msgpack file, and `manifest.json` with their sha256), which `mmjax.export` writes. This
module reads and writes both as plain files and numpy trees. It knows nothing of families,
optimizers or train states, so anything that needs a model's weights (the loader, a family
that rides on a frozen VAE) can read them without the training code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import numpy as np
from flax import serialization

EXPORT_CONFIG = "config.json"
EXPORT_PARAMS = "ema_params.msgpack"
EXPORT_MANIFEST = "manifest.json"
EXPORT_DTYPES = ("float32", "float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class StoredModel:
    config: dict
    params: Any  # nested dicts of numpy arrays; floating arrays as float32
    step: int
    path: str


def is_export(path: str) -> bool:
    return os.path.exists(os.path.join(path, EXPORT_MANIFEST))


def _map(fn, tree):
    return {k: _map(fn, v) if isinstance(v, dict) else fn(np.asarray(v)) for k, v in tree.items()}


def _float32(tree):
    return _map(lambda x: x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) else x, tree)


def _read_export(path: str) -> StoredModel:
    with open(os.path.join(path, EXPORT_MANIFEST), encoding="utf-8") as f:
        manifest = json.load(f)
    with open(os.path.join(path, EXPORT_CONFIG), encoding="utf-8") as f:
        config = json.load(f)
    with open(os.path.join(path, EXPORT_PARAMS), "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise ValueError(f"{path}: {EXPORT_PARAMS} is damaged (its sha256 does not match {EXPORT_MANIFEST})")
    # Stored at reduced precision or not, inference computes from float32 weights.
    return StoredModel(config, _float32(serialization.msgpack_restore(data)), int(manifest["step"]), path)


def read_config(path: str, step: int | None = None) -> dict:
    """The saved config of the model in `path` (a workdir or an export), without its weights."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"workdir not found: {path!r}")
    if is_export(path):
        if step is not None:
            raise ValueError(f"{path} is an exported model with one step; do not pass step")
        with open(os.path.join(path, EXPORT_CONFIG), encoding="utf-8") as f:
            return json.load(f)
    from mmjax.checkpoint import Checkpointer

    with Checkpointer(path, read_only=True) as ckpt:
        return ckpt.restore_config(step)


def read(path: str, step: int | None = None) -> StoredModel:
    """The config and EMA weights in `path` (a workdir or an export); never writes to it.

    A workdir gives its newest good step (damaged newer steps are skipped with a warning)
    unless `step` names one.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"workdir not found: {path!r}")
    if is_export(path):
        if step is not None:
            raise ValueError(f"{path} is an exported model with one step; do not pass step")
        return _read_export(path)
    from mmjax.checkpoint import restore_numpy

    restored = restore_numpy(path, step)
    return StoredModel(restored.config, _float32(restored.state["ema_params"]), int(restored.step), path)


def write_export(out_dir: str, stored: StoredModel, dtype: str = "float32",
                 files: dict[str, str] | None = None) -> str:
    """Writes `stored` as an export directory. Written to a temporary directory and renamed
    into place, so `out_dir` is never half-written; an existing `out_dir` is refused.

    `dtype` ('float16' or 'bfloat16') stores floating weights at half the size; `read` casts
    them back to float32. Measure the exported model: rounding can change samples.
    `files`: more text files to write beside the weights (name -> contents), e.g. the
    word vocabulary `tokenizer.json`.
    """
    if os.path.exists(out_dir):
        raise FileExistsError(f"refusing to overwrite {out_dir!r}; remove it first")
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
    params = stored.params
    if dtype != "float32":
        import jax.numpy as jnp  # bfloat16 is a numpy dtype only through ml_dtypes, as jax has it

        target = jnp.dtype(dtype)
        params = _map(lambda x: x.astype(target) if np.issubdtype(x.dtype, np.floating) else x, params)
    data = serialization.msgpack_serialize(params)
    tmp = f"{out_dir.rstrip(os.sep)}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    with open(os.path.join(tmp, EXPORT_CONFIG), "w", encoding="utf-8") as f:
        json.dump(stored.config, f, indent=2, sort_keys=True)
    with open(os.path.join(tmp, EXPORT_PARAMS), "wb") as f:
        f.write(data)
    for name, text in (files or {}).items():
        with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
            f.write(text)
    manifest = {"step": stored.step, "source": stored.path, "stored_dtype": dtype, "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest()}
    with open(os.path.join(tmp, EXPORT_MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, out_dir)
    return out_dir

