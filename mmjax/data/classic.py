"""CIFAR-10 and MNIST from their original files in a local directory (nothing is downloaded).

    CIFAR-10: data_batch_1 .. data_batch_5, test_batch, batches.meta (the "python version",
              as unpacked from cifar-10-python.tar.gz: DIR or DIR/cifar-10-batches-py)
    MNIST:    train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
              t10k-labels-idx1-ubyte, each optionally gzipped (.gz) and with "." for the last
              "-" (train-images.idx3-ubyte); DIR or DIR/MNIST/raw (torchvision's layout)

Captions name the class through `caption_template` ("a photo of a {class}"): CIFAR-10's class
names come from batches.meta, MNIST's are "digit 0" .. "digit 9". Images are resized to
`image_size` (bicubic); MNIST's gray digits become 3-channel gray RGB.
"""
from __future__ import annotations

import gzip
import os
import pickle
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from mmjax.data import real

CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILES = ("test_batch",)
CIFAR_META_FILE = "batches.meta"
MNIST_PREFIXES = {"train": "train", "test": "t10k"}
MNIST_CLASS_NAMES = tuple(f"digit {d}" for d in range(10))
# IDX type codes -> numpy dtypes (big-endian, as the format stores them).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class ClassicSource:
    """Grain random-access source over an in-memory array dataset.

    The arrays are loaded by `loader()` on first use in each process and are not pickled, so
    grain worker processes each read the files instead of receiving a copy through a pipe.
    """

    def __init__(self, loader: Callable[[], tuple[np.ndarray, np.ndarray]], labels: np.ndarray,
                 class_names: Sequence[str], *, image_size: int,
                 caption_template: str = real.DEFAULT_CAPTION_TEMPLATE,
                 indices: np.ndarray | None = None, images: np.ndarray | None = None,
                 name: str = ""):
        self._loader = loader
        self._images = images  # already loaded by the caller, or None to load on first use
        self.class_names = tuple(class_names)
        self.image_size = int(image_size)
        self.indices = np.arange(len(labels)) if indices is None else np.asarray(indices)
        self.labels = np.asarray(labels, np.int32)[self.indices]
        self.name = name
        real.check_caption_template(caption_template)
        self._class_captions = [real.class_caption(caption_template, c) for c in self.class_names]
        self.sample_weights: np.ndarray | None = None  # set to balance sampling (pipeline)

    @property
    def captions(self) -> list[str]:
        return [self._class_captions[label] for label in self.labels]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        if self._images is None:
            self._images = self._loader()[0]
        index = int(index)
        image = self._images[self.indices[index]]
        if image.shape[-1] == 1:
            image = np.repeat(image, 3, axis=-1)
        if image.shape[:2] != (self.image_size, self.image_size):
            resized = Image.fromarray(image).resize((self.image_size, self.image_size),
                                                    Image.Resampling.BICUBIC)
            image = np.asarray(resized, dtype=np.uint8)
        label = int(self.labels[index])
        return real.make_record(image, self._class_captions[label], label)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None}

    def __repr__(self) -> str:
        return f"ClassicSource({self.name!r}, {len(self)} images, image_size={self.image_size})"


def _first(total: int, num_records: int | None) -> np.ndarray:
    """The first `num_records` records (all when None); neither file set is sorted by class."""
    return np.arange(total if num_records is None else min(total, num_records))


def _require(path: str, names: Sequence[str], dataset: str) -> None:
    missing = [n for n in names if not os.path.isfile(os.path.join(path, n))]
    if missing:
        raise ValueError(f"{dataset}: {path!r} lacks {', '.join(missing)} (data.path should be the "
                         f"folder holding the dataset's files; nothing is downloaded)")


# ----------------------------------------------------------------------------- CIFAR-10

class _ArraysOnly(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a pickle can run any code it names,
    and a dataset file has no business naming anything else."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"),
                # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, "latin1").
                ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")
        return super().find_class(module, name)


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            data = _ArraysOnly(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise ValueError(f"cifar10: cannot read {path!r}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"cifar10: {path!r} holds a {type(data).__name__}, not a dict")
    # Keys are bytes in the original (Python 2) files, str if re-pickled by Python 3.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def cifar10_dir(path: str) -> str:
    nested = os.path.join(path, "cifar-10-batches-py")
    return nested if os.path.isdir(nested) else path


def _cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    try:
        data = np.asarray(batch["data"], np.uint8)
        labels = np.asarray(batch["labels"], np.int64)
    except KeyError as e:
        raise ValueError(f"cifar10: {path!r} has no {e.args[0]!r} entry") from e
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(f"cifar10: {path!r} holds data of shape {data.shape} and {len(labels)} labels; "
                         "expected [N, 3072] and N")
    # Rows are the red plane, then green, then blue, each 32x32 row-major.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


class _CifarLoader:
    """Picklable: the files to read, not their contents."""

    def __init__(self, files: Sequence[str]):
        self.files = list(files)

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        parts = [_cifar_batch(f) for f in self.files]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def load_cifar10(path: str, split: str = "train", *, image_size: int = 32,
                 caption_template: str = real.DEFAULT_CAPTION_TEMPLATE,
                 num_records: int | None = None) -> ClassicSource:
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    folder = cifar10_dir(path)
    names = CIFAR_TRAIN_FILES if split == "train" else CIFAR_TEST_FILES
    _require(folder, (*names, CIFAR_META_FILE), "cifar10")
    meta = _unpickle(os.path.join(folder, CIFAR_META_FILE))
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("label_names", [])]
    loader = _CifarLoader([os.path.join(folder, n) for n in names])
    images, labels = loader()
    if not class_names or labels.min() < 0 or labels.max() >= len(class_names):
        raise ValueError(f"cifar10: labels in {folder!r} range over [{labels.min()}, {labels.max()}] "
                         f"but batches.meta names {len(class_names)} classes")
    return ClassicSource(loader, labels, class_names, image_size=image_size,
                         caption_template=caption_template, indices=_first(len(labels), num_records),
                         images=images, name=f"cifar10 {split} ({folder})")


# ----------------------------------------------------------------------------- MNIST

def read_idx(path: str) -> np.ndarray:
    """An IDX file (gzipped when its name ends in .gz) as a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip raises BadGzipFile (an OSError) or EOFError
        raise ValueError(f"mnist: cannot read {path!r}: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"mnist: {path!r} is not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"mnist: {path!r} is truncated in its header")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"mnist: {path!r} has {len(data) - header} bytes of data, expected "
                         f"{expected} for shape {shape}")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def mnist_dir(path: str) -> str:
    nested = os.path.join(path, "MNIST", "raw")
    return nested if os.path.isdir(nested) else path


def _find_idx(folder: str, prefix: str, kind: str) -> str:
    dims = "idx3" if kind == "images" else "idx1"
    candidates = [f"{prefix}-{kind}{sep}{dims}-ubyte{gz}" for sep in ("-", ".") for gz in ("", ".gz")]
    for name in candidates:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise ValueError(f"mnist: {folder!r} has none of {', '.join(candidates)} (data.path should be "
                     "the folder holding the IDX files; nothing is downloaded)")


class _MnistLoader:
    def __init__(self, images_path: str, labels_path: str):
        self.images_path, self.labels_path = images_path, labels_path

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        images = read_idx(self.images_path)
        labels = read_idx(self.labels_path).astype(np.int64)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"mnist: {self.images_path!r} holds {images.dtype} of shape {images.shape}; "
                             "expected uint8 [N, H, W]")
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"mnist: {len(images)} images but labels of shape {labels.shape}")
        return images[..., None], labels


def load_mnist(path: str, split: str = "train", *, image_size: int = 32,
               caption_template: str = real.DEFAULT_CAPTION_TEMPLATE,
               num_records: int | None = None) -> ClassicSource:
    folder = mnist_dir(path)
    prefix = MNIST_PREFIXES.get(split)
    if prefix is None:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(MNIST_PREFIXES)}")
    loader = _MnistLoader(_find_idx(folder, prefix, "images"), _find_idx(folder, prefix, "labels"))
    images, labels = loader()
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"mnist: labels range over [{labels.min()}, {labels.max()}], expected digits 0-9")
    return ClassicSource(loader, labels, MNIST_CLASS_NAMES, image_size=image_size,
                         caption_template=caption_template, indices=_first(len(labels), num_records),
                         images=images, name=f"mnist {split} ({folder})")

