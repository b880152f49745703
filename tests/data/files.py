"""Writers for tiny datasets in every supported format, and for odd and broken image files.
Everything is made in a temporary directory by the tests; nothing is downloaded."""
from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def ramp_image(width: int, height: int, base: int = 0) -> np.ndarray:
    """uint8 [H, W, 3]: red = 10 * column (so crops and flips are visible), green = base."""
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = (np.arange(width) * 10)[None, :]
    image[..., 1] = base
    image[..., 2] = 200
    return image


def save(path: Path, image: np.ndarray | Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    image.save(path, **kwargs)
    return path


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _png(width: int, height: int, bit_depth: int, color_type: int, idat: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    """A PNG built chunk by chunk, for what Pillow cannot write (16-bit RGB, huge headers).
    `raw` holds the rows without their filter bytes."""
    row = len(raw) // height
    filtered = b"".join(b"\0" + raw[i * row:(i + 1) * row] for i in range(height))
    return _png(width, height, bit_depth, color_type, zlib.compress(filtered, 9))


def bomb_png(side: int = 12_000) -> bytes:
    """A 1-bit black square of side x side pixels (144M at the default): about 20 kB on disk,
    over 400 MB once decoded to RGB."""
    row = b"\0" * (1 + (side + 7) // 8)  # filter byte, then the packed bits
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return _png(side, side, 1, 0, body)


def encoded(image: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def bad_file_bytes(kind: str) -> bytes:
    """The bytes of one kind of unusable image file."""
    photo = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    if kind == "truncated_png":
        data = encoded(photo, "PNG")
        return data[: len(data) // 2]
    if kind == "truncated_jpeg":
        data = encoded(photo, "JPEG", quality=90)
        return data[: len(data) // 2]
    if kind == "empty":
        return b""
    if kind == "garbage":
        return np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes()
    if kind == "text":
        return b"this is not an image\n"
    if kind == "bad_crc_png":
        data = bytearray(encoded(photo, "PNG"))
        data[60] ^= 0xFF  # inside the first IDAT chunk: its CRC no longer matches
        return bytes(data)
    if kind == "bomb":
        return bomb_png()
    raise ValueError(kind)


BAD_KINDS = ("truncated_png", "truncated_jpeg", "empty", "garbage", "text", "bad_crc_png", "bomb")


def class_folder(root: Path, counts: dict[str, int], *, size=(24, 16), ext="png") -> dict[str, list[Path]]:
    """root/<class>/<i>.<ext>, each image a ramp whose green channel is the class's index."""
    paths = {}
    for c, (name, n) in enumerate(sorted(counts.items())):
        paths[name] = [save(root / name / f"{i:03d}.{ext}", ramp_image(*size, base=10 * c)) for i in range(n)]
    return paths


def metadata_folder(root: Path, captions: dict[str, str], *, size=(16, 16)) -> None:
    """Images named by `captions`' keys (relative paths) and a metadata.jsonl captioning them."""
    root.mkdir(parents=True, exist_ok=True)
    for i, rel in enumerate(captions):
        save(root / rel, ramp_image(*size, base=i))
    with open(root / "metadata.jsonl", "w", encoding="utf-8") as f:
        for rel, text in captions.items():
            f.write(json.dumps({"file_name": rel, "text": text}) + "\n")


def cifar_images(n: int, offset: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(offset)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = [(offset + i) % 10 for i in range(n)]
    return images, labels


def cifar10(root: Path, per_batch: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    """The python-pickle layout of cifar-10-batches-py, with `per_batch` records per file.
    Returns each file's (HWC images, labels) for comparison."""
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        images, labels = cifar_images(per_batch, offset=k * per_batch)
        batch = {b"batch_label": name.encode(), b"labels": labels,
                 b"data": images.transpose(0, 3, 1, 2).reshape(per_batch, 3072),
                 b"filenames": [f"img_{k}_{i}.png".encode() for i in range(per_batch)]}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        written[name] = (images, labels)
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [n.encode() for n in CIFAR_NAMES],
            b"num_vis": 3072}
    with open(root / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return written


def idx_bytes(array: np.ndarray) -> bytes:
    assert array.dtype == np.uint8
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def mnist(root: Path, *, n_train: int = 20, n_test: int = 10, gz: bool = False, sep: str = "-") -> dict:
    """The four IDX files (gzipped with `gz`); returns {split: (images [N, 28, 28], labels)}."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        rng = np.random.default_rng(n)
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) * 3 % 10).astype(np.uint8)
        for kind, array, dims in (("images", images, "idx3"), ("labels", labels, "idx1")):
            name = f"{prefix}-{kind}{sep}{dims}-ubyte" + (".gz" if gz else "")
            data = idx_bytes(array)
            with (gzip.open if gz else open)(os.path.join(root, name), "wb") as f:
                f.write(data)
        out[split] = (images, labels)
    return out
