"""The project's parameters of an SD pipeline back to a diffusers-format folder.

The import (`diffusers_pipeline`) maps each diffusers tensor onto a parameter leaf by transposes
and reshapes. The export inverts that without a second, hand-written key map: it runs the same
conversion on tensors whose entries are their own positions (1, 2, 3, ... across the component),
so each parameter leaf says, element by element, where its values go. Every position must be
written exactly once; a leaf the format has no tensor for (the zero q/k/v biases SD's attention
lacks) must still be zero. Tensors keep the names, shapes and dtypes of the layout they were
imported from, so import followed by export gives the same bytes.
"""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np

from mmjax.interop import safetensors_io


def layout_of(weights: str) -> tuple[dict, dict]:
    """`({name: (shape, dtype name)}, metadata)` of a safetensors file."""
    header, metadata, _ = safetensors_io.read_header(weights)
    return {n: (tuple(e["shape"]), e["dtype"]) for n, e in header.items()}, metadata


def tensors_from_params(convert, params, layout: dict, what: str) -> dict[str, np.ndarray]:
    """The diffusers tensors (`layout`: name -> (shape, safetensors dtype)) holding `params`,
    where `convert(tensors) -> params` is the import's conversion."""
    names = sorted(layout)
    sizes = [int(np.prod(layout[n][0], dtype=np.int64)) for n in names]
    total = int(sum(sizes))
    index_type = np.int32 if total < 2**31 - 1 else np.int64
    positions, start = {}, 1
    for name, size in zip(names, sizes):
        positions[name] = (np.arange(start, start + size, dtype=index_type)).reshape(layout[name][0])
        start += size
    where = convert(positions)
    flat_where = dict(jax.tree_util.tree_leaves_with_path(where))
    wide = any(layout[n][1] == "F64" for n in names)
    values = np.zeros(total + 1, np.float64 if wide else np.float32)
    written = np.zeros(total + 1, np.int32)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if path not in flat_where:
            raise ValueError(f"{what}: parameter {jax.tree_util.keystr(path)} has no place in the diffusers layout")
        index = np.asarray(flat_where[path]).reshape(-1)
        value = np.asarray(jax.device_get(leaf)).reshape(-1)
        if index.shape != value.shape:
            raise ValueError(f"{what}: parameter {jax.tree_util.keystr(path)} has {value.size} values, its "
                             f"place in the diffusers layout {index.size}")
        missing = index == 0
        if missing.any():
            if np.any(value[missing] != 0):
                raise ValueError(f"{what}: parameter {jax.tree_util.keystr(path)} has nonzero values the diffusers "
                                 "format has no tensor for (a bias SD's attention does not have); it cannot be "
                                 "exported faithfully")
            index, value = index[~missing], value[~missing]
        values[index] = value
        np.add.at(written, index, 1)
    if np.any(written[1:] != 1):
        first = int(np.argmax(written[1:] != 1)) + 1
        name = names[int(np.searchsorted(np.cumsum(sizes), first))]
        raise ValueError(f"{what}: tensor {name!r} is written {written[first]} times by the parameters, not once")
    out, start = {}, 1
    for name, size in zip(names, sizes):
        dtype = safetensors_io.DTYPES[layout[name][1]]
        out[name] = values[start:start + size].reshape(layout[name][0]).astype(dtype)
        start += size
    return out


def write_folder(out_dir: str, source: str, components: dict) -> str:
    """A diffusers folder at `out_dir`: `source`'s model_index.json, configs, tokenizer and
    scheduler, with each component's weights from `components` (name -> (file name, tensors,
    metadata)). Written to a temporary folder and renamed: never half-written, never over
    an existing folder."""
    if os.path.exists(out_dir):
        raise FileExistsError(f"refusing to overwrite {out_dir!r}; remove it first")
    tmp = f"{out_dir.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        shutil.copy2(os.path.join(source, "model_index.json"), tmp)
        for name in ("tokenizer", "scheduler"):
            shutil.copytree(os.path.join(source, name), os.path.join(tmp, name))
        for name, (file_name, tensors, metadata) in components.items():
            os.makedirs(os.path.join(tmp, name))
            shutil.copy2(os.path.join(source, name, "config.json"), os.path.join(tmp, name))
            safetensors_io.write(os.path.join(tmp, name, file_name), tensors, metadata)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
