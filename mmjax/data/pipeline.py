"""The Grain input pipeline: host-only numpy, index-addressable batches.

Batch k is `dataset[k]` of a grain `MapDataset`, so it is a pure function of
(seed, k, process_index, process_count). Resuming needs only the next batch index, and the
result does not depend on the number of worker processes, unlike a grain iterator state.
The one seam to devices is the caller's `jax.make_array_from_process_local_data`.

Sources may carry two optional attributes that the pipeline honours:
- `sample_weights`: per-record probabilities; shuffled batches then draw records with
  replacement by these weights (balanced sampling), each draw seeded by (seed, position).
- `random_crop`: records come from `source.uncropped()` (shorter side at the image size)
  and are cropped square at random, seeded like the flips.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Protocol, Sequence

import grain
import numpy as np

from mmjax.data import classic, folder, real
from mmjax.data.decode import random_square_crop
from mmjax.data.shapes import ShapesSource, caption_style
from mmjax.data.tokenizer import ByteTokenizer

logger = logging.getLogger(__name__)

LABEL_KEYS = ("shape", "color", "size", "position")
# Every batch also has `label`: the class id of real data, -1 where there is none (shapes,
# whose labels are the four attributes above, and captions from metadata.jsonl).
CLASS_KEY = "label"
# Passed from the batch function (possibly in a worker process) to BatchIterator, which
# counts and removes it, so truncation is reported in the consuming process.
_TRUNCATED_KEY = "_num_truncated"


class RandomAccessSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict: ...


def _num_records(data_cfg: Any, split: str) -> int | None:
    return getattr(data_cfg, "num_train" if split == "train" else "num_test", None)


def _make_shapes(data_cfg: Any, split: str) -> RandomAccessSource:
    return ShapesSource(
        split=split, image_size=data_cfg.image_size, seed=data_cfg.seed,
        num_records=_num_records(data_cfg, split),
        heldout_in_train=getattr(data_cfg, "heldout_in_train", False),
        captions=caption_style(data_cfg),
    )


def _balance(source, data_cfg: Any, split: str):
    """Sets the train split's `sample_weights` from `data.balance` (evaluation stays plain)."""
    if split != "train" or not data_cfg.balance:
        return source
    groups, names = real.balance_groups(source.labels, source.captions, source.class_names,
                                        data_cfg.balance, tuple(data_cfg.balance_words))
    source.sample_weights = real.balance_weights(groups, names, where=source.name)
    return source


def _make_folder(data_cfg: Any, split: str) -> RandomAccessSource:
    source = folder.load_folder(
        data_cfg.path, split, image_size=data_cfg.image_size,
        caption_template=data_cfg.caption_template, test_fraction=data_cfg.test_fraction,
        max_bad_fraction=data_cfg.max_bad_fraction, max_pixels=data_cfg.max_image_pixels,
        num_records=_num_records(data_cfg, split),
        random_crop=split == "train" and data_cfg.crop == "random",
    )
    return _balance(source, data_cfg, split)


def _make_cifar10(data_cfg: Any, split: str) -> RandomAccessSource:
    source = classic.load_cifar10(data_cfg.path, split, image_size=data_cfg.image_size,
                                  caption_template=data_cfg.caption_template,
                                  num_records=_num_records(data_cfg, split))
    return _balance(source, data_cfg, split)


def _make_mnist(data_cfg: Any, split: str) -> RandomAccessSource:
    source = classic.load_mnist(data_cfg.path, split, image_size=data_cfg.image_size,
                                caption_template=data_cfg.caption_template,
                                num_records=_num_records(data_cfg, split))
    return _balance(source, data_cfg, split)


# Explicit registry: a new dataset adds an entry here.
SOURCES: dict[str, Callable[[Any, str], RandomAccessSource]] = {
    "shapes": _make_shapes,
    "folder": _make_folder,
    "cifar10": _make_cifar10,
    "mnist": _make_mnist,
}
# Datasets read from `data.path` (the rest are generated).
PATH_DATASETS = ("folder", "cifar10", "mnist")


def make_source(data_cfg: Any, split: str) -> RandomAccessSource:
    """The split of the dataset named by `data_cfg.name`, configured from `data_cfg`."""
    if data_cfg.name not in SOURCES:
        raise ValueError(f"unknown dataset {data_cfg.name!r}; known datasets: {sorted(SOURCES)}")
    return SOURCES[data_cfg.name](data_cfg, split)


class _Augment:
    """Per-record randomness, drawn from grain's (seed, index) generator: a horizontal flip
    with probability 1/2 (drawn first, so flips alone match earlier versions), then a random
    square crop of records read uncropped."""

    def __init__(self, flip: bool, crop: bool):
        self.flip, self.crop = flip, crop

    def __call__(self, record: dict, rng: np.random.Generator) -> dict:
        # Flips are off by default for shapes: its captions and position labels name left and
        # right, and a flip would make them wrong. Labels are deliberately not rewritten here.
        flip = self.flip and rng.random() < 0.5
        image = record["image"]
        if self.crop:
            image = random_square_crop(image, rng)
        if flip:
            image = image[:, ::-1]
        return dict(record, image=image)


class _WeightedDraw:
    """Maps a position to a record index drawn by weight (inverse CDF of one uniform)."""

    def __init__(self, weights: np.ndarray):
        weights = np.asarray(weights, np.float64)
        if weights.ndim != 1 or not len(weights) or (weights < 0).any() or not weights.sum() > 0:
            raise ValueError("sample_weights must be non-negative with a positive sum")
        self.cdf = np.cumsum(weights / weights.sum())

    def __call__(self, _position: int, rng: np.random.Generator) -> int:
        return min(int(np.searchsorted(self.cdf, rng.random(), side="right")), len(self.cdf) - 1)


class _Lookup:
    def __init__(self, source: RandomAccessSource):
        self.source = source

    def __call__(self, index: int) -> dict:
        return self.source[index]


def _collate(records: Sequence[dict], tokenizer) -> dict:
    """Stacks records into model inputs: images NHWC float32 in [-1, 1], tokens int32;
    captions are tokenized here and never enter the batch as strings."""
    images = np.stack([r["image"] for r in records]).astype(np.float32)
    tokens, truncated = tokenizer.encode_texts([r["caption"] for r in records])
    batch = {"image": images / 127.5 - 1.0, "tokens": tokens}
    for key in LABEL_KEYS:
        batch[key] = np.asarray([r[key] for r in records], np.int32)
    batch[CLASS_KEY] = np.asarray([r.get(CLASS_KEY, real.NO_LABEL) for r in records], np.int32)
    batch["unseen"] = np.asarray([r["unseen"] for r in records], bool)
    batch[_TRUNCATED_KEY] = truncated
    return batch


class _Collate:
    """Picklable batch function (grain pickles the pipeline into worker processes)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, records: Sequence[dict]) -> dict:
        return _collate(records, self.tokenizer)


def _tokenizer(max_len: int | None, tokenizer):
    if tokenizer is not None:
        if max_len is not None and max_len != tokenizer.max_len:
            raise ValueError(f"max_len={max_len} but the tokenizer writes rows of {tokenizer.max_len}")
        return tokenizer
    if max_len is None:
        raise ValueError("pass a tokenizer (mmjax.data.tokenizer.for_config) or max_len (bytes)")
    return ByteTokenizer(max_len)


def make_batch_dataset(
    source: RandomAccessSource,
    *,
    global_batch: int,
    max_len: int | None = None,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
    num_epochs: int | None = None,
    augment: bool = False,
    tokenizer=None,
) -> grain.MapDataset:
    """A `MapDataset` whose element k is this process's k-th local batch; captions are
    tokenized by `tokenizer`, or by bytes into rows of `max_len`."""
    tokenizer = _tokenizer(max_len, tokenizer)
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"bad process_index={process_index} for process_count={process_count}")
    if global_batch < 1 or global_batch % process_count:
        raise ValueError(
            f"global_batch={global_batch} must be a positive multiple of "
            f"process_count={process_count}"
        )
    local_batch = global_batch // process_count
    per_process = len(source) // process_count
    if per_process < local_batch:
        raise ValueError(
            f"{len(source)} records give each of {process_count} processes {per_process}, "
            f"fewer than one local batch of {local_batch}"
        )
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")

    random_crop = bool(getattr(source, "random_crop", False))
    records = source.uncropped() if random_crop else source
    weights = getattr(source, "sample_weights", None) if shuffle else None
    if weights is not None:
        if len(weights) != len(source):
            raise ValueError(f"{len(weights)} sample_weights for {len(source)} records")
        # Position p of epoch e draws its record from a generator seeded by (seed, e, p), its
        # own stream apart from the augmentation's.
        ds = (grain.MapDataset.range(len(source))
              .random_map(_WeightedDraw(weights), seed=_draw_seed(seed))
              .map(_Lookup(records)))
    else:
        ds = grain.MapDataset.source(records)
    if augment or random_crop:
        # Seeded by (seed, record index, epoch) through grain's index propagation, so a
        # record's flip and crop do not depend on the process count.
        ds = ds.random_map(_Augment(flip=augment, crop=random_crop), seed=seed)
    if shuffle:
        # Reshuffled each epoch: `repeat` below feeds the epoch number back into the seed.
        ds = ds.shuffle(seed=seed)
    # Drop the epoch's remainder so every process gets the same number of records; then
    # stride, so processes read disjoint records of the same shuffled epoch.
    ds = ds[: per_process * process_count][process_index::process_count]
    ds = ds.repeat(num_epochs)
    return ds.batch(local_batch, drop_remainder=True, batch_fn=_Collate(tokenizer))


def _draw_seed(seed: int) -> int:
    return int(np.random.SeedSequence([seed, 0x5EED]).generate_state(1)[0])


def _allow_unparsed_absl_flags() -> None:
    # grain's mp_prefetch reads an absl flag and raises UnparsedFlagAccessError in
    # programs that do not start through absl.app (pytest, notebooks): google/grain#1355.
    # Marking flags parsed keeps their defaults; an absl.app program has parsed them already.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class BatchIterator(Iterator[dict]):
    """Iterates local batches from `start_batch` on, tracking the next batch index.

    `get_state()` is JSON-serialisable; resume with
    `make_batches(..., start_batch=state["next_batch"])` (checked by `check_resume`).
    """

    def __init__(
        self,
        dataset: grain.MapDataset,
        *,
        start_batch: int,
        worker_count: int,
        tokenizer,
        describe: dict,
    ):
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self._next_batch = int(start_batch)
        self._describe = describe
        self._tokenizer = tokenizer
        # Elements here are whole batches, so a short buffer is plenty and bounds memory.
        read_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
        ds = dataset[start_batch:].to_iter_dataset(read_options)
        if worker_count > 0:
            _allow_unparsed_absl_flags()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
        self._iterator = iter(ds)

    @property
    def num_truncated(self) -> int:
        """Captions truncated by tokenization so far (warned about once)."""
        return self._tokenizer.num_truncated

    def __next__(self) -> dict:
        batch = next(self._iterator)
        self._tokenizer.record_truncated(int(batch.pop(_TRUNCATED_KEY)))
        self._next_batch += 1
        return batch

    def get_state(self) -> dict:
        return {"next_batch": self._next_batch, **self._describe}

    def check_resume(self, state: dict) -> None:
        """Refuses a saved state taken under a different seed, batch size or sharding,
        where its next_batch would address different data."""
        for key, value in self._describe.items():
            if key in state and state[key] != value:
                raise ValueError(
                    f"data iterator state has {key}={state[key]!r} but this run has {value!r}"
                )

    def close(self) -> None:
        """Stops worker processes now rather than at garbage collection."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_batches(
    source: RandomAccessSource,
    *,
    global_batch: int,
    max_len: int | None = None,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    start_batch: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    worker_count: int = 0,
    augment: bool = False,
    tokenizer=None,
) -> BatchIterator:
    """This process's batches: dicts of numpy arrays with `image` float32 [b, S, S, 3] in
    [-1, 1], `tokens` int32 [b, max_len], `shape`/`color`/`size`/`position` int32 [b] (-1
    for real data), `label` int32 [b] (the class id, -1 for shapes and metadata captions)
    and `unseen` bool [b], where b = global_batch // process_count.

    `num_epochs=None` repeats forever. Each epoch drops `len(source) % process_count`
    records so processes get equal shares; batches may straddle epochs, and only a final
    partial batch is dropped. `augment` flips images horizontally at random; leave it off
    for shapes, whose captions name left and right. A source's `sample_weights` (used only
    when shuffling) and `random_crop` apply as the module docstring says.
    """
    tokenizer = _tokenizer(max_len, tokenizer)
    dataset = make_batch_dataset(
        source,
        global_batch=global_batch,
        tokenizer=tokenizer,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        shuffle=shuffle,
        num_epochs=num_epochs,
        augment=augment,
    )
    describe = {
        "seed": int(seed),
        "global_batch": int(global_batch),
        "process_count": int(process_count),
        "shuffle": bool(shuffle),
        "augment": bool(augment),
    }
    return BatchIterator(
        dataset,
        start_batch=start_batch,
        worker_count=worker_count,
        tokenizer=tokenizer,
        describe=describe,
    )
