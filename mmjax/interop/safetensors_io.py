"""`.safetensors` files to numpy, every dtype included, with no framework.

The format: an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range (plus an optional `__metadata__` of strings), then the raw little-endian
data. The `safetensors` library's numpy reader has no bfloat16, which many checkpoints use; this
reader maps BF16 through `ml_dtypes` (as JAX does), and memory-maps the file so that a tensor is
read only when used. Tensors keep their stored dtype unless `dtype` asks for another.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("bool"),
}
MAX_HEADER = 100 * 2**20  # the format's own limit on the JSON header


def read_header(path: str) -> tuple[dict, dict, int]:
    """(tensor entries by name, `__metadata__`, byte offset where the data starts)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no safetensors file {path!r}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER or 8 + length > size:
            raise ValueError(f"{path}: not a safetensors file, or truncated (header of {length} bytes in a "
                             f"{size}-byte file)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: the safetensors header is not JSON ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + length
    for name, entry in header.items():
        if entry.get("dtype") not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {entry.get('dtype')!r}; readable: {sorted(DTYPES)}")
        begin, end = entry["data_offsets"]
        expected = int(np.prod(entry["shape"], dtype=np.int64)) * DTYPES[entry["dtype"]].itemsize
        if end - begin != expected or start + end > size:
            raise ValueError(f"{path}: tensor {name!r} ({entry['dtype']} {entry['shape']}) has bytes "
                             f"{begin}..{end}, which do not fit its shape or the file; the file is damaged")
    return header, metadata, start


def read(path: str, dtype=None) -> dict[str, np.ndarray]:
    """Every tensor in `path` as a numpy array (memory-mapped, read-only). `dtype`, when given,
    converts the floating ones (e.g. np.float32); integer tensors are never converted."""
    header, _, start = read_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        array = data[start + begin:start + end].view(DTYPES[entry["dtype"]]).reshape(entry["shape"])
        if dtype is not None and entry["dtype"] in ("F64", "F32", "F16", "BF16"):
            array = array.astype(dtype)
        out[name] = array
    return out


def write(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes `tensors` (numpy, any dtype in DTYPES) as a `.safetensors` file: names sorted,
    data 8-byte aligned as the format's own writer lays it out. Written beside `path` and
    renamed into place, so a reader never sees half a file."""
    names = {np.dtype(v): k for k, v in DTYPES.items()}
    header, offset, chunks = {}, 0, []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype not in names:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot hold")
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": names[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    if metadata:
        header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}, **header}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for data in chunks:
            f.write(data)
    os.replace(tmp, path)
