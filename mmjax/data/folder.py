"""Image-folder datasets: images in a directory tree, captioned by a `metadata.jsonl` or by
their class folder.

Layouts (the conventions of Hugging Face `imagefolder`):

    DIR/metadata.jsonl + images        {"file_name": "a/b.png", "text": "a red bird"} per line;
                                       file_name is relative to the metadata file's folder
    DIR/<class>/**/image.png           caption "a photo of a <class>" (data.caption_template)
    DIR/train/..., DIR/test/...        either layout inside explicit split folders

Splits: `DIR/train` (and `DIR/test`, or else `validation`/`val`) when present. Without a test
folder, files are split by a hash of their path relative to the split root: a fraction
`test_fraction` (default 0.1) goes to test, the same on every machine and unchanged as files
are added. Every file is decoded once when the source is built; files that cannot be used are
skipped and listed in the log, and above `max_bad_fraction` building fails (see `real.py`).
"""
from __future__ import annotations

import concurrent.futures
import copy
import json
import logging
import os
from typing import Sequence

import numpy as np

from mmjax.data import real
from mmjax.data.decode import (DEFAULT_MAX_PIXELS, BadImageError, decode_image, fit_square,
                               is_image_file)

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.jsonl"
CAPTION_FIELDS = ("text", "caption")
TEST_DIRS = ("test", "validation", "val")
DEFAULT_TEST_FRACTION = 0.1
SPLITS = ("train", "test")


class FolderSource:
    """Grain random-access source over decoded-and-checked image files.

    `source[i]` is a record (see `real.make_record`) whose image is the file resized so its
    shorter side is `image_size`, then centre-cropped. With `random_crop`, the pipeline reads
    `uncropped()` instead and crops each record at random (a crop along the longer side).
    Picklable: grain worker processes get the file list, not decoded images.
    """

    def __init__(self, files: Sequence[str], captions: Sequence[str], labels: Sequence[int], *,
                 image_size: int, class_names: Sequence[str] = (), random_crop: bool = False,
                 max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "folder"):
        if not (len(files) == len(captions) == len(labels)):
            raise ValueError("files, captions and labels must have the same length")
        self.files = list(files)
        self.captions = list(captions)
        self.labels = np.asarray(labels, np.int32)
        self.class_names = tuple(class_names)
        self.image_size = int(image_size)
        self.random_crop = bool(random_crop)
        self.max_pixels = int(max_pixels)
        self.name = name
        self.sample_weights: np.ndarray | None = None  # set to balance sampling (pipeline)
        self._crop = True

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        path = self.files[index]
        try:
            image = decode_image(path, max_pixels=self.max_pixels, min_size=self.image_size)
        except BadImageError as e:
            raise BadImageError(f"{path}: {e} (it decoded when the dataset was scanned: did the "
                                "file change since?)") from e
        image = fit_square(image, self.image_size, crop=self._crop)
        return real.make_record(image, self.captions[index], int(self.labels[index]))

    def uncropped(self) -> FolderSource:
        """The same records with the shorter side at `image_size` and no crop yet."""
        view = copy.copy(self)
        view._crop = False
        return view

    def __repr__(self) -> str:
        return (f"FolderSource({self.name!r}, {len(self)} images, image_size={self.image_size}, "
                f"classes={len(self.class_names)}, random_crop={self.random_crop})")


# ----------------------------------------------------------------------------- layout

def _walk_files(root: str) -> list[str]:
    """All non-hidden files under `root`, as sorted posix paths relative to it."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = os.path.relpath(folder, root)
        for name in files:
            if not name.startswith("."):
                found.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    return sorted(found)


def split_roots(path: str, split: str) -> tuple[str, bool]:
    """(folder holding the split's files, whether to hash-split that folder's files)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not os.path.isdir(path):
        raise ValueError(f"data.path {path!r} is not a directory")
    train_dir = os.path.join(path, "train")
    base = train_dir if os.path.isdir(train_dir) else path
    test_dirs = [os.path.join(path, d) for d in TEST_DIRS if os.path.isdir(os.path.join(path, d))]
    if base == train_dir and test_dirs:
        return (train_dir if split == "train" else test_dirs[0]), False
    return base, True


def _in_split(key: str, split: str, hashed: bool, test_fraction: float) -> bool:
    if not hashed:
        return True
    return (real.hash_fraction(key, "split") < test_fraction) == (split == "test")


def _read_metadata(root: str, metadata_paths: list[str]) -> list[tuple[str, str]]:
    """(file path relative to `root`, caption) per metadata line, in file order."""
    entries = []
    for rel_meta in metadata_paths:
        meta_path = os.path.join(root, rel_meta)
        folder = os.path.dirname(rel_meta)
        with open(meta_path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{meta_path}:{line_no}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not a JSON object: {e}") from e
                if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
                    raise ValueError(f"{where}: needs a string \"file_name\"")
                caption = next((row[k] for k in CAPTION_FIELDS if k in row), None)
                if not isinstance(caption, str):
                    raise ValueError(f"{where}: needs a string caption in one of {CAPTION_FIELDS}")
                rel = os.path.normpath(os.path.join(folder, row["file_name"])).replace(os.sep, "/")
                entries.append((rel, caption))
    return entries


def _class_layout(root: str, files: list[str], class_names: Sequence[str]) -> tuple[list[str], list[int], int]:
    """Files inside a class folder with their class ids, and how many lie outside any class."""
    index = {name: i for i, name in enumerate(class_names)}
    kept, labels, loose = [], [], 0
    for rel in files:
        top, sep, _ = rel.partition("/")
        if sep and top in index:
            kept.append(rel)
            labels.append(index[top])
        else:
            loose += 1
    return kept, labels, loose


def class_folders(path: str) -> list[str]:
    """Sorted class names: top-level folders holding images, over every split folder, so a
    class's id is the same in train and test."""
    roots = {split_roots(path, s)[0] for s in SPLITS}
    names = set()
    for root in roots:
        for entry in os.scandir(root):
            if entry.is_dir() and not entry.name.startswith(".") and any(
                    is_image_file(f) for f in _walk_files(entry.path)):
                names.add(entry.name)
    return sorted(names)


# ----------------------------------------------------------------------------- building

def _check_all(paths: Sequence[str], max_pixels: int, min_size: int) -> list[str | None]:
    """The reason each file cannot be used, or None; decoded in threads (Pillow releases
    the GIL while decoding), as `FolderSource` will decode them."""
    def check(path):
        try:
            decode_image(path, max_pixels=max_pixels, min_size=min_size)
            return None
        except BadImageError as e:
            return str(e)

    workers = min(8, (os.cpu_count() or 1) + 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(check, paths))


def load_folder(path: str, split: str = "train", *, image_size: int = 32,
                caption_template: str = real.DEFAULT_CAPTION_TEMPLATE,
                test_fraction: float = DEFAULT_TEST_FRACTION, max_bad_fraction: float = 0.01,
                max_pixels: int = DEFAULT_MAX_PIXELS, num_records: int | None = None,
                random_crop: bool = False) -> FolderSource:
    """Finds, captions and checks the split's images (see the module docstring).

    `num_records` keeps a stable pseudo-random subset of that many files (before checking).
    Raises ValueError for a missing or empty folder, malformed metadata, or too many bad files.
    """
    real.check_caption_template(caption_template)
    root, hashed = split_roots(path, split)
    all_files = _walk_files(root)
    metadata = [f for f in all_files if os.path.basename(f) == METADATA_FILE]
    in_split = lambda rel: _in_split(rel, split, hashed, test_fraction)
    if metadata:
        entries = [(rel, caption) for rel, caption in _read_metadata(root, metadata) if in_split(rel)]
        listed = {rel for rel, _ in entries}
        unlisted = sum(1 for f in all_files if is_image_file(f) and f not in listed and in_split(f))
        if unlisted:
            logger.warning("%s: %d image files are not in any %s and are not used",
                           root, unlisted, METADATA_FILE)
        rels = [rel for rel, _ in entries]
        captions = [caption for _, caption in entries]
        labels = [real.NO_LABEL] * len(entries)
        class_names: list[str] = []
    else:
        class_names = class_folders(path)
        images = [f for f in all_files if is_image_file(f)]
        if not class_names:
            raise ValueError(
                f"{root}: found {len(images)} image files but no {METADATA_FILE} and no class "
                "folders; put images in DIR/<class>/ or caption them in DIR/metadata.jsonl")
        rels, labels, loose = _class_layout(root, [f for f in images if in_split(f)], class_names)
        if loose:
            logger.warning("%s: %d image files outside a class folder are not used", root, loose)
        captions = [real.class_caption(caption_template, class_names[i]) for i in labels]

    keep = real.subset([f"{rel}\0{i}" for i, rel in enumerate(rels)], num_records)
    rels, captions = [rels[i] for i in keep], [captions[i] for i in keep]
    labels = [labels[i] for i in keep]
    paths = [os.path.join(root, rel) for rel in rels]
    where = f"{root} ({split} split)"
    if not paths:
        hint = (f"; the split is by hash with data.test_fraction={test_fraction:g}: add images or a "
                "test/ folder" if hashed else "")
        raise ValueError(f"{where}: no images{hint}")
    reasons = _check_all(paths, max_pixels, image_size)
    real.report_bad_files([(p, r) for p, r in zip(paths, reasons) if r is not None], len(paths),
                          max_bad_fraction, where)
    good = [i for i, r in enumerate(reasons) if r is None]
    source = FolderSource([paths[i] for i in good], [captions[i] for i in good],
                          [labels[i] for i in good], image_size=image_size,
                          class_names=class_names, random_crop=random_crop,
                          max_pixels=max_pixels, name=where)
    logger.info("%s: %d images, %s", where, len(source),
                f"{len(class_names)} classes" if class_names else f"captions from {METADATA_FILE}")
    return source
