"""The input pipeline: batch k is a pure function of (seed, k, process), whatever the workers."""
import json
import logging
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmjax.data import ShapesSource, make_batches, make_source, parse_caption
from mmjax.data.tokenizer import ByteTokenizer

REPO = Path(__file__).resolve().parents[2]


class IndexedSource:
    """Records that carry their own index in `shape`, so tests can see which records a
    batch holds; captions grow with the index to exercise truncation."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        i = int(i)
        image = np.full((2, 2, 3), i % 256, np.uint8)
        image[:, 0] = 0  # asymmetric, so a horizontal flip is visible
        return {"image": image, "caption": "x" * (i % 12), "shape": np.int32(i),
                "color": np.int32(0), "size": np.int32(0), "position": np.int32(0), "unseen": False}


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batch_format():
    source = ShapesSource(image_size=16, num_records=64)
    batch = next(make_batches(source, global_batch=8, max_len=64, seed=0))
    assert set(batch) == {"image", "tokens", "shape", "color", "size", "position", "label", "unseen"}
    assert (batch["label"] == -1).all() and batch["label"].dtype == np.int32  # no single class
    assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["image"].min() == -1.0  # black background
    assert batch["tokens"].shape == (8, 64) and batch["tokens"].dtype == np.int32
    for key in ("shape", "color", "size", "position"):
        assert batch[key].shape == (8,) and batch[key].dtype == np.int32
    assert batch["unseen"].dtype == bool
    # Tokens decode to captions that name the batch's labels.
    captions = ByteTokenizer(64).decode(batch["tokens"])
    for caption, color, shape in zip(captions, batch["color"], batch["shape"]):
        parsed = parse_caption(caption)
        assert (parsed["color"], parsed["shape"]) == (color, shape)


def test_deterministic_and_seed_dependent():
    source = IndexedSource(40)
    run = lambda seed: _take(make_batches(source, global_batch=4, max_len=8, seed=seed), 12)
    _assert_same(run(3), run(3))
    assert not all((a["shape"] == b["shape"]).all() for a, b in zip(run(3), run(4)))


def test_epochs_are_reshuffled_permutations():
    source = IndexedSource(20)
    batches = _take(make_batches(source, global_batch=5, max_len=8, seed=0), 8)
    ids = np.concatenate([b["shape"] for b in batches])
    first, second = ids[:20], ids[20:]
    assert sorted(first) == list(range(20)) and sorted(second) == list(range(20))
    assert (first != np.arange(20)).any() and (first != second).any()


def test_start_batch_resumes_exactly():
    source = IndexedSource(30)
    kwargs = dict(global_batch=4, max_len=8, seed=1)
    fresh = make_batches(source, **kwargs)
    straight = _take(fresh, 10)
    state = json.loads(json.dumps(make_batches(source, **kwargs, start_batch=0).get_state()))
    assert state["next_batch"] == 0
    assert fresh.get_state()["next_batch"] == 10
    for k in (0, 7, 9):
        resumed = make_batches(source, **kwargs, start_batch=k)
        _assert_same(_take(resumed, 10 - k), straight[k:])
    resumed = make_batches(source, **kwargs, start_batch=fresh.get_state()["next_batch"])
    _assert_same(_take(resumed, 2), _take(fresh, 2))
    resumed.check_resume(fresh.get_state())
    with pytest.raises(ValueError, match="seed"):
        make_batches(source, global_batch=4, max_len=8, seed=2).check_resume(fresh.get_state())


@pytest.mark.parametrize("shuffle", [True, False])
def test_processes_get_disjoint_equal_shards(shuffle):
    source = IndexedSource(23)  # odd on purpose: the remainder must not unbalance processes
    shards = []
    for p in range(2):
        it = make_batches(source, global_batch=4, max_len=8, seed=0, process_index=p,
                          process_count=2, shuffle=shuffle, num_epochs=1)
        batches = list(it)
        assert all(b["image"].shape[0] == 2 for b in batches)
        shards.append(np.concatenate([b["shape"] for b in batches]))
    assert len(shards[0]) == len(shards[1]) == 10  # 11 records each, then drop remainder
    assert not set(shards[0]) & set(shards[1])
    with pytest.raises(ValueError, match="process_count"):
        make_batches(source, global_batch=5, max_len=8, seed=0, process_count=2)


def test_evaluation_iterates_in_order_once():
    batches = list(make_batches(IndexedSource(10), global_batch=4, max_len=8, seed=0,
                                shuffle=False, num_epochs=1))
    assert [b["shape"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_truncation_is_counted_in_the_consumer(caplog):
    with caplog.at_level(logging.WARNING, logger="mmjax.data.tokenizer"):
        it = make_batches(IndexedSource(12), global_batch=12, max_len=8, seed=0,
                          shuffle=False, num_epochs=1)
        next(it)
    assert it.num_truncated == 5  # captions of 7..11 bytes exceed 6 bytes of room
    assert "max_len=8" in caplog.text


def test_augment_flips_deterministically():
    source = IndexedSource(64)
    kwargs = dict(global_batch=64, max_len=8, seed=0, shuffle=False, num_epochs=1)
    plain = next(make_batches(source, **kwargs))["image"]
    flipped = next(make_batches(source, **kwargs, augment=True))["image"]
    again = next(make_batches(source, **kwargs, augment=True))["image"]
    np.testing.assert_array_equal(flipped, again)
    is_flipped = [(f == p[:, ::-1]).all() and not (f == p).all() for f, p in zip(flipped, plain)]
    is_same = [(f == p).all() for f, p in zip(flipped, plain)]
    assert all(a or b for a, b in zip(is_flipped, is_same))
    assert 10 < sum(is_flipped) < 54


@pytest.mark.e2e
def test_worker_processes_give_identical_batches():
    source = ShapesSource(image_size=16, num_records=48)
    kwargs = dict(global_batch=8, max_len=64, seed=0, start_batch=2, num_epochs=1)
    serial = list(make_batches(source, **kwargs))
    assert len(serial) == 4
    # One epoch, so this also checks that workers end cleanly instead of hanging.
    with make_batches(source, **kwargs, worker_count=2) as parallel:
        _assert_same(list(parallel), serial)
        assert parallel.get_state()["next_batch"] == 6


def test_make_source_from_config():
    cfg = types.SimpleNamespace(name="shapes", image_size=16, seed=3, num_train=100, num_test=None)
    train, test = make_source(cfg, "train"), make_source(cfg, "test")
    assert len(train) == 100 and len(test) == 2000
    assert train[0]["image"].shape == (16, 16, 3)
    with pytest.raises(ValueError, match="'nope'.*shapes"):
        make_source(types.SimpleNamespace(name="nope"), "train")


@pytest.mark.e2e
def test_preview_cli(tmp_path):
    out = tmp_path / "preview.png"
    cmd = [sys.executable, "-m", "mmjax.data", "preview", "--dataset", "shapes", "--out", str(out),
           "--split", "test", "--num", "6", "--image-size", "32"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=60)
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width >= 3 * 96
        pixels = np.asarray(image.convert("RGB"))
    assert (pixels == 255).all(axis=-1).any(), "caption text should be drawn"

    bad = subprocess.run(cmd[:5] + ["nope", "--out", str(tmp_path / "x.png")], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "nope" in bad.stderr
