"""Image folders: layouts, captions, splits, bad files, crops, balanced sampling, workers."""
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmjax import config as config_lib
from mmjax.data import folder, make_batches, make_source, real
from mmjax.data.tokenizer import ByteTokenizer
from tests.data import files

REPO = Path(__file__).resolve().parents[2]


def data_cfg(path, **overrides):
    cfg = config_lib.base_config().data
    cfg.name, cfg.path, cfg.image_size = "folder", str(path), 16
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_class_folders_give_captions_labels_and_centre_crops(tmp_path, caplog):
    files.class_folder(tmp_path / "train", {"cat": 3, "dog": 2, "apple_tree": 2})
    files.class_folder(tmp_path / "test", {"cat": 1, "zebra": 1})
    files.save(tmp_path / "train" / "loose.png", files.ramp_image(16, 16))
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "cat" / ".hidden.png").write_bytes(b"ignored")
    with caplog.at_level(logging.INFO, logger="mmjax.data"):
        train, test = (make_source(data_cfg(tmp_path), s) for s in ("train", "test"))
    # Class ids come from every split's folders, so "zebra" (test only) has one id everywhere.
    assert train.class_names == test.class_names == ("apple_tree", "cat", "dog", "zebra")
    assert len(train) == 7 and len(test) == 2
    assert train.labels.tolist() == [0, 0, 1, 1, 1, 2, 2] and test.labels.tolist() == [1, 3]
    assert train.captions[0] == "a photo of an apple tree" and train.captions[-1] == "a photo of a dog"
    record = train[2]
    assert record["caption"] == "a photo of a cat" and record["label"] == 1
    assert all(record[k] == -1 for k in ("shape", "color", "size", "position")) and not record["unseen"]
    assert record["image"].dtype == np.uint8 and record["image"].shape == (16, 16, 3)
    # 24x16 images keep their size and lose 4 columns on each side (red = 10 * column).
    np.testing.assert_array_equal(record["image"][0, :, 0], np.arange(4, 20) * 10)
    assert "1 image files outside a class folder" in caplog.text

    custom = make_source(data_cfg(tmp_path, caption_template="{class}, photographed"), "train")
    assert custom.captions[0] == "apple tree, photographed"


def test_metadata_jsonl_captions(tmp_path, caplog):
    captions = {"a.png": "a red bird on a wire", "sub/b.png": "two dogs", "c.jpg": "a cat"}
    files.metadata_folder(tmp_path / "train", captions)
    files.save(tmp_path / "train" / "unlisted.png", files.ramp_image(16, 16))
    # A second metadata file, with paths relative to its own folder and a "caption" field.
    files.save(tmp_path / "train" / "more" / "d.png", files.ramp_image(16, 16))
    with open(tmp_path / "train" / "more" / "metadata.jsonl", "w") as f:
        f.write(json.dumps({"file_name": "d.png", "caption": "a fourth image"}) + "\n")
        f.write(json.dumps({"file_name": "gone.png", "text": "listed but missing"}) + "\n")
    files.metadata_folder(tmp_path / "test", {"t.png": "a test image"})
    with caplog.at_level(logging.INFO, logger="mmjax.data"):
        train = make_source(data_cfg(tmp_path, max_bad_fraction=0.5), "train")
    assert sorted(train.captions) == ["a cat", "a fourth image", "a red bird on a wire", "two dogs"]
    assert (train.labels == -1).all() and train.class_names == ()
    by_caption = {train[i]["caption"]: train[i] for i in range(len(train))}
    assert by_caption["two dogs"]["label"] == -1
    assert "1 image files are not in any metadata.jsonl" in caplog.text
    assert "gone.png: cannot read file" in caplog.text
    assert make_source(data_cfg(tmp_path), "test").captions == ["a test image"]

    with open(tmp_path / "test" / "metadata.jsonl", "a") as f:
        f.write('{"file_name": "t.png", "text": \n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:2: not a JSON object"):
        make_source(data_cfg(tmp_path), "test")


def test_hash_split_is_disjoint_stable_and_sized(tmp_path):
    files.class_folder(tmp_path, {"a": 40, "b": 40}, size=(16, 16))
    split = lambda **kw: {s: set(make_source(data_cfg(tmp_path, **kw), s).files) for s in ("train", "test")}
    first = split()
    assert not first["train"] & first["test"] and len(first["train"] | first["test"]) == 80
    assert 2 <= len(first["test"]) <= 16  # 10% of 80, by hash
    half = split(test_fraction=0.5)
    assert 25 <= len(half["test"]) <= 55 and first["test"] <= half["test"]
    # Adding files moves none of the old ones across the split.
    files.save(tmp_path / "a" / "new.png", files.ramp_image(16, 16))
    again = split()
    assert first["test"] <= again["test"] and first["train"] <= again["train"]
    # A subset (data.num_train) is a stable pick that keeps both classes.
    subset = make_source(data_cfg(tmp_path, num_train=10), "train")
    assert len(subset) == 10 and set(subset.labels.tolist()) == {0, 1}
    assert subset.files == make_source(data_cfg(tmp_path, num_train=10), "train").files
    # One image, hashed into train (a/000.png hashes to 0.21): an empty test split says why.
    files.class_folder(tmp_path / "one", {"a": 1})
    with pytest.raises(ValueError, match="no images; the split is by hash with data.test_fraction=0.1"):
        make_source(data_cfg(tmp_path / "one"), "test")


def _bad_folder(root: Path, num_good: int) -> list[Path]:
    files.class_folder(root / "test", {"good": 2})
    good = files.class_folder(root / "train", {"good": num_good})["good"]
    bad = []
    for kind in files.BAD_KINDS:
        path = root / "train" / "good" / f"bad_{kind}.png"
        path.write_bytes(files.bad_file_bytes(kind))
        bad.append(path)
    # Odd but valid images are kept.
    for name in ("rgba.png", "palette.png", "gray16.png"):
        image = {"rgba.png": Image.new("RGBA", (20, 16), (255, 0, 0, 128)),
                 "palette.png": Image.new("P", (16, 20), 3),
                 "gray16.png": Image.fromarray(np.full((16, 16), 60000, np.uint16))}[name]
        files.save(root / "train" / "good" / name, image)
    assert len(good) == num_good
    return bad


def test_bad_images_are_skipped_listed_and_limited(tmp_path, caplog, monkeypatch):
    bad = _bad_folder(tmp_path, num_good=20)
    total = 20 + 3 + len(bad)
    with caplog.at_level(logging.INFO, logger="mmjax.data"):
        source = make_source(data_cfg(tmp_path, max_bad_fraction=0.5), "train")
    assert len(source) == 23
    assert not set(map(str, bad)) & set(source.files)
    assert f"skipping {len(bad)} of {total} images" in caplog.text
    for path in bad:
        assert str(path) in caplog.text
    for i in range(len(source)):
        image = source[i]["image"]
        assert image.shape == (16, 16, 3) and image.dtype == np.uint8

    with pytest.raises(ValueError) as info:
        make_source(data_cfg(tmp_path, max_bad_fraction=0.1), "train")
    message = str(info.value)
    assert f"{len(bad)} of {total} images ({100 * len(bad) / total:.1f}%)" in message
    assert "data.max_bad_fraction=0.1" in message

    caplog.clear()
    monkeypatch.setattr(real, "MAX_LISTED_BAD_FILES", 3)
    with caplog.at_level(logging.WARNING, logger="mmjax.data"):
        make_source(data_cfg(tmp_path, max_bad_fraction=0.5), "train")
    assert f"... and {len(bad) - 3} more" in caplog.text
    assert sum(str(p) in caplog.text for p in bad) == 3

    # A smaller pixel limit turns big-but-valid images into bad ones.
    with pytest.raises(ValueError, match="pixels exceeds the limit"):
        make_source(data_cfg(tmp_path, max_image_pixels=100, max_bad_fraction=0.5), "train")


def _imbalanced(root: Path) -> None:
    files.class_folder(root / "train", {"cat": 12, "dog": 4})
    files.class_folder(root / "test", {"cat": 2, "dog": 2})


@pytest.mark.e2e
def test_random_crops_flips_and_balance_are_identical_with_workers(tmp_path, caplog):
    _imbalanced(tmp_path)
    cfg = data_cfg(tmp_path, crop="random", augment=True, balance="label")
    with caplog.at_level(logging.INFO, logger="mmjax.data"):
        source = make_source(cfg, "train")
    assert "cat: 12 records, 75.0% -> 50.0% of draws" in caplog.text
    assert "dog: 4 records, 25.0% -> 50.0% of draws" in caplog.text
    kwargs = dict(global_batch=8, max_len=32, seed=3, augment=True, num_epochs=3)
    serial = list(make_batches(source, **kwargs))
    assert len(serial) == 6  # 16 draws an epoch
    with make_batches(source, **kwargs, worker_count=2) as parallel:
        batches = list(parallel)
    assert len(batches) == len(serial)
    for a, b in zip(serial, batches):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)

    batch = serial[0]
    assert batch["image"].shape == (8, 16, 16, 3)
    assert set(batch["label"].tolist()) <= {0, 1} and (batch["shape"] == -1).all()
    captions = ByteTokenizer(32).decode(batch["tokens"])
    assert captions == [("a photo of a cat", "a photo of a dog")[label] for label in batch["label"]]
    # Red is 10 * column: a crop's first column shows its offset (0..8), a flip reverses it.
    rows = np.rint((np.concatenate([b["image"] for b in serial])[:, 0, :, 0] + 1) * 127.5) / 10
    flipped = rows[:, 0] > rows[:, -1]
    offsets = np.where(flipped, rows[:, -1], rows[:, 0])
    assert set(offsets.tolist()) <= set(range(9)) and len(set(offsets.tolist())) >= 5
    assert 8 <= flipped.sum() <= 40
    # Evaluation reads the test split centred and unweighted.
    test = make_source(cfg, "test")
    assert test.sample_weights is None and not test.random_crop
    np.testing.assert_array_equal(test[0]["image"][0, :, 0], np.arange(4, 20) * 10)


def test_balanced_sampling_is_balanced_deterministic_and_resumable(tmp_path):
    _imbalanced(tmp_path)
    source = make_source(data_cfg(tmp_path, balance="label"), "train")
    np.testing.assert_allclose(real.effective_distribution(source.sample_weights, source.labels, 2), [0.5, 0.5])
    kwargs = dict(global_batch=16, max_len=8, seed=0)
    straight = _take(make_batches(source, **kwargs), 25)
    labels = np.concatenate([b["label"] for b in straight])
    assert abs((labels == 1).mean() - 0.5) < 0.08  # 400 draws; unbalanced it would be 0.25
    resumed = _take(make_batches(source, **kwargs, start_batch=20), 5)
    for a, b in zip(resumed, straight[20:]):
        np.testing.assert_array_equal(a["image"], b["image"])
    other = _take(make_batches(source, global_batch=16, max_len=8, seed=1), 2)
    assert not all((a["label"] == b["label"]).all() for a, b in zip(other, straight))
    # Unshuffled reads (evaluation, a family's prepare step) ignore the weights.
    plain = list(make_batches(source, global_batch=16, max_len=8, seed=0, shuffle=False, num_epochs=1))
    assert plain[0]["label"].tolist() == [0] * 12 + [1] * 4


def test_balance_by_caption_words(tmp_path, caplog):
    captions = {f"{i}.png": text for i, text in enumerate(
        ["a cat asleep"] * 8 + ["a Dog running"] * 2 + ["a bird", "concatenated words"])}
    files.metadata_folder(tmp_path, captions)
    cfg = data_cfg(tmp_path, balance="caption_words", balance_words=("cat", "dog"), test_fraction=0.01)
    with caplog.at_level(logging.INFO, logger="mmjax.data"):
        source = make_source(cfg, "train")
    assert len(source) == 12
    groups, names = real.balance_groups(source.labels, source.captions, (), "caption_words", ("cat", "dog"))
    assert names == ["cat", "dog", "(no listed word)"]
    # "concatenated" does not contain the word "cat".
    assert np.bincount(groups).tolist() == [8, 2, 2]
    np.testing.assert_allclose(real.effective_distribution(source.sample_weights, groups, 3), [1 / 3] * 3)
    assert "(no listed word): 2 records, 16.7% -> 33.3% of draws" in caplog.text
    with pytest.raises(ValueError, match="caption_words"):
        make_source(data_cfg(tmp_path, balance="label"), "train")


def _load(*overrides, spec="configs/vae_shapes.py:tiny"):
    return config_lib.load_config(str(REPO / spec.split(":")[0]) + ":" + spec.split(":")[1], list(overrides))


def test_config_checks_name_the_key(tmp_path):
    _imbalanced(tmp_path)
    path = f"data.path={tmp_path}"
    config = _load("data.name=folder", path, "data.crop=random", "data.balance=label")
    assert config.data.crop == "random"
    cases = [
        (("data.name=folder",), "data.path"),
        (("data.name=folder", f"data.path={tmp_path / 'nope'}"), "data.path"),
        (("data.name=folder", path, "data.crop=diagonal"), "data.crop"),
        (("data.name=folder", path, "data.balance=classes"), "data.balance"),
        (("data.name=folder", path, "data.balance=caption_words"), "data.balance_words"),
        (("data.name=folder", path, "data.caption_template=a photo"), "data.caption_template"),
        (("data.name=folder", path, "data.max_bad_fraction=1.5"), "data.max_bad_fraction"),
        (("data.name=folder", path, "data.test_fraction=0"), "data.test_fraction"),
        (("data.balance=label",), "data.balance"),
    ]
    for overrides, key in cases:
        with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
            _load(*overrides)
    # The CNN judge's heads need the shapes attributes: refused up front, not trained on -1s.
    with pytest.raises(config_lib.ConfigError, match="only the shapes dataset has"):
        _load("data.name=folder", path, spec="configs/cnn_shapes.py:tiny")


@pytest.mark.parametrize("layout", ["classes", "metadata"])
@pytest.mark.e2e
def test_preview_cli(tmp_path, layout):
    root = tmp_path / "data"
    if layout == "classes":
        files.class_folder(root / "train", {"cat": 6, "dog": 6})
        files.class_folder(root / "test", {"cat": 1, "dog": 1})
        broken = root / "train" / "cat" / "broken.png"
    else:
        names = [f"{i}.png" for i in range(12)] + ["broken.png"]
        files.metadata_folder(root / "train", {name: f"image {name}" for name in names})
        files.metadata_folder(root / "test", {"t.png": "a test image"})
        broken = root / "train" / "broken.png"
    broken.write_bytes(b"garbage")
    out = tmp_path / "preview.png"
    proc = subprocess.run([sys.executable, "-m", "mmjax.data", "preview", "--dataset", "folder",
                           "--path", str(root), "--out", str(out), "--num", "4"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 4 of 12 folder/train records" in proc.stdout
    assert f"{broken}: not an image" in proc.stderr
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width >= 4 * 32
    missing = subprocess.run([sys.executable, "-m", "mmjax.data", "preview", "--dataset", "folder",
                              "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "--path" in missing.stderr


def test_source_survives_pickling(tmp_path):
    import pickle

    files.class_folder(tmp_path, {"a": 4, "b": 4}, size=(16, 16))
    source = folder.load_folder(str(tmp_path), "train", image_size=16, test_fraction=0.01)
    clone = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(clone[3]["image"], source[3]["image"])
    assert clone.uncropped()[3]["image"].shape == (16, 16, 3)
