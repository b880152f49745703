"""CIFAR-10 (python pickle batches) and MNIST (IDX, gzipped or not) from a local directory."""
import gzip
import logging
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmjax import config as config_lib
from mmjax.data import make_batches, make_source
from mmjax.data.classic import load_cifar10, load_mnist, read_idx
from mmjax.data.tokenizer import ByteTokenizer
from tests.data import files

REPO = Path(__file__).resolve().parents[2]


def data_cfg(name, path, **overrides):
    cfg = config_lib.base_config().data
    cfg.name, cfg.path = name, str(path)
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


@pytest.mark.parametrize("nested", [False, True])
def test_cifar10_records_match_the_files(tmp_path, nested):
    folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    written = files.cifar10(folder, per_batch=4)
    train = make_source(data_cfg("cifar10", tmp_path), "train")
    test = make_source(data_cfg("cifar10", tmp_path), "test")
    assert len(train) == 20 and len(test) == 4
    assert train.class_names == tuple(files.CIFAR_NAMES)
    # Record 5 is the second image of data_batch_2: channel planes back to HWC exactly.
    images, labels = written["data_batch_2"]
    record = train[5]
    np.testing.assert_array_equal(record["image"], images[1])
    assert record["label"] == labels[1] == 5
    assert record["caption"] == "a photo of a dog"
    assert train[0]["caption"] == "a photo of an airplane"
    assert all(record[k] == -1 for k in ("shape", "color", "size", "position"))
    np.testing.assert_array_equal(test[3]["image"], written["test_batch"][0][3])

    batch = next(make_batches(train, global_batch=8, max_len=32, seed=0))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["label"].dtype == np.int32
    captions = ByteTokenizer(32).decode(batch["tokens"])
    assert captions == [f"a photo of {'an' if train.class_names[label][0] in 'aeiou' else 'a'} "
                        f"{train.class_names[label]}" for label in batch["label"]]

    small = make_source(data_cfg("cifar10", tmp_path, image_size=16, num_train=6), "train")
    assert len(small) == 6 and small[0]["image"].shape == (16, 16, 3)


def test_cifar10_balance_and_pickling(tmp_path, caplog):
    files.cifar10(tmp_path, per_batch=4)
    with caplog.at_level(logging.INFO, logger="mmjax.data"):
        train = make_source(data_cfg("cifar10", tmp_path, balance="label"), "train")
    assert train.sample_weights is not None and "balanced sampling over 10 groups" in caplog.text
    # Worker processes get the file names, not the arrays, and read the same records.
    clone = pickle.loads(pickle.dumps(train))
    assert clone._images is None and len(pickle.dumps(train)) < 10_000
    np.testing.assert_array_equal(clone[7]["image"], train[7]["image"])


def test_cifar10_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="lacks data_batch_1.*batches.meta.*nothing is downloaded"):
        make_source(data_cfg("cifar10", tmp_path), "train")
    files.cifar10(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(b"\x80\x02}q\x00")  # cut short
    with pytest.raises(ValueError, match="data_batch_3"):
        load_cifar10(str(tmp_path), "train")
    # A pickle naming anything but numpy arrays is refused, not executed.
    import datetime

    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0],
                     b"when": datetime.date(2020, 1, 1)}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing to load datetime.date"):
        load_cifar10(str(tmp_path), "train")


@pytest.mark.parametrize("gz,sep", [(False, "-"), (True, "-"), (True, ".")])
def test_mnist_records_match_the_files(tmp_path, gz, sep):
    written = files.mnist(tmp_path, gz=gz, sep=sep)
    train = make_source(data_cfg("mnist", tmp_path, image_size=28), "train")
    test = make_source(data_cfg("mnist", tmp_path, image_size=28), "test")
    assert len(train) == 20 and len(test) == 10
    images, labels = written["test"]
    record = test[4]
    assert record["image"].shape == (28, 28, 3) and record["image"].dtype == np.uint8
    for channel in range(3):  # gray digits as 3-channel gray
        np.testing.assert_array_equal(record["image"][..., channel], images[4])
    assert record["label"] == labels[4] == 2 and record["caption"] == "a photo of a digit 2"
    resized = make_source(data_cfg("mnist", tmp_path), "train")[0]["image"]
    assert resized.shape == (32, 32, 3)
    assert abs(float(resized.mean()) - float(written["train"][0][0].mean())) < 8


def test_mnist_torchvision_layout_and_bad_files(tmp_path):
    files.mnist(tmp_path / "MNIST" / "raw", gz=True)
    assert len(load_mnist(str(tmp_path), "train")) == 20
    raw = tmp_path / "MNIST" / "raw"
    with gzip.open(raw / "t10k-images-idx3-ubyte.gz", "rb") as f:
        data = f.read()
    with gzip.open(raw / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(data[:-100])
    with pytest.raises(ValueError, match="bytes of data, expected 7840"):
        load_mnist(str(tmp_path), "test")
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot read"):
        load_mnist(str(tmp_path), "test")
    plain = tmp_path / "bad.idx"
    plain.write_bytes(b"\x12\x34\x08\x01" + b"\0" * 8)
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(str(plain))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        load_mnist(str(tmp_path / "MNIST"), "train")


@pytest.mark.parametrize("dataset", ["cifar10", "mnist"])
@pytest.mark.e2e
def test_preview_cli(tmp_path, dataset):
    root = tmp_path / dataset
    files.cifar10(root) if dataset == "cifar10" else files.mnist(root, gz=True)
    out = tmp_path / "preview.png"
    proc = subprocess.run([sys.executable, "-m", "mmjax.data", "preview", "--dataset", dataset,
                           "--path", str(root), "--out", str(out), "--split", "test", "--num", "4"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote 4 of {4 if dataset == 'cifar10' else 10} {dataset}/test records" in proc.stdout
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width >= 4 * 32
