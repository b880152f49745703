"""What the real-data sources (image folders, CIFAR-10, MNIST) share: the record format,
class captions, the bad-file report and the weights that balance sampling.

A real record has the keys of a shapes record, so every batch has one key set: `image`
uint8 [S, S, 3], `caption`, `label` (class id, or -1 where captions come from metadata),
the shapes attributes `shape`/`color`/`size`/`position` as -1 and `unseen` False.
"""
from __future__ import annotations

import hashlib
import logging
import re
import string
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

NO_LABEL = -1
SHAPES_LABEL_KEYS = ("shape", "color", "size", "position")
DEFAULT_CAPTION_TEMPLATE = "a photo of a {class}"
BALANCE_MODES = ("", "label", "caption_words")
MAX_LISTED_BAD_FILES = 20
_OTHER_GROUP = "(no listed word)"


def make_record(image: np.ndarray, caption: str, label: int) -> dict:
    record = {"image": image, "caption": caption, "label": np.int32(label)}
    record.update({key: np.int32(NO_LABEL) for key in SHAPES_LABEL_KEYS})
    record["unseen"] = False
    return record


def check_caption_template(template: str) -> str:
    """The template must name `{class}` and nothing else; ValueError otherwise."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ValueError(f"caption template {template!r} is not a format string: {e}") from e
    if fields != {"class"}:
        raise ValueError(f"caption template {template!r} must contain {{class}} and no other "
                         f"field, found {sorted(fields) or 'none'}")
    return template


def class_caption(template: str, class_name: str) -> str:
    """`template` with `{class}` filled by the class name (underscores read as spaces); an
    article "a" right before the name becomes "an" before a vowel ("a photo of an apple")."""
    name = class_name.replace("_", " ").strip()
    if name and name[0].lower() in "aeiou":
        template = re.sub(r"\b([Aa]) \{class\}", r"\1n {class}", template)
    return template.format_map({"class": name})


def hash_fraction(key: str, salt: str = "") -> float:
    """A stable number in [0, 1) for a key: the same on every machine and Python version,
    unlike `hash()`, so splits and subsets never move."""
    digest = hashlib.sha1(f"{salt}\0{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def subset(keys: Sequence[str], limit: int | None) -> list[int]:
    """Indices of at most `limit` keys, a pseudo-random but stable choice (by hash rank) so a
    subset of a class-sorted folder still holds every class; returned in their original order."""
    if limit is None or limit >= len(keys):
        return list(range(len(keys)))
    ranked = sorted(range(len(keys)), key=lambda i: hash_fraction(keys[i], "subset"))
    return sorted(ranked[:limit])


def report_bad_files(bad: Sequence[tuple[str, str]], total: int, max_bad_fraction: float,
                     where: str) -> None:
    """Logs the skipped files (paths and reasons, at most MAX_LISTED_BAD_FILES) and raises a
    ValueError when their fraction of `total` exceeds `max_bad_fraction`."""
    if total == 0:
        raise ValueError(f"no image files found in {where}")
    if not bad:
        logger.info("%s: all %d images decode", where, total)
        return
    fraction = len(bad) / total
    lines = [f"  {path}: {reason}" for path, reason in bad[:MAX_LISTED_BAD_FILES]]
    if len(bad) > MAX_LISTED_BAD_FILES:
        lines.append(f"  ... and {len(bad) - MAX_LISTED_BAD_FILES} more")
    logger.warning("%s: skipping %d of %d images (%.1f%%) that cannot be used:\n%s",
                   where, len(bad), total, 100 * fraction, "\n".join(lines))
    if fraction > max_bad_fraction or len(bad) == total:
        raise ValueError(
            f"{where}: {len(bad)} of {total} images ({100 * fraction:.1f}%) cannot be used, more "
            f"than data.max_bad_fraction={max_bad_fraction:g} allows; the log lists them "
            f"(first: {bad[0][0]}: {bad[0][1]}). Fix or remove them, or raise data.max_bad_fraction."
        )


# ----------------------------------------------------------------------------- balancing

def balance_groups(labels: np.ndarray, captions: Sequence[str], class_names: Sequence[str],
                   mode: str, words: Sequence[str] = ()) -> tuple[np.ndarray, list[str]]:
    """(group id per record, group names) for `mode`: "label" groups by class; "caption_words"
    by the first of `words` that a caption contains as a whole word (case-insensitive), with
    captions naming none of them in one more group."""
    if mode == "label":
        if len(labels) and (labels < 0).any():
            raise ValueError("data.balance='label' needs class labels, but captions come from "
                             "metadata.jsonl (label -1); balance by data.balance='caption_words'")
        return np.asarray(labels, np.int64), list(class_names)
    if mode == "caption_words":
        if not words:
            raise ValueError("data.balance='caption_words' needs data.balance_words, e.g. ('cat', 'dog')")
        lowered = [w.lower() for w in words]
        patterns = [re.compile(rf"\b{re.escape(w)}\b") for w in lowered]
        groups = np.full(len(captions), len(words), np.int64)
        for i, caption in enumerate(captions):
            text = caption.lower()
            for g, pattern in enumerate(patterns):
                if pattern.search(text):
                    groups[i] = g
                    break
        return groups, [*words, _OTHER_GROUP]
    raise ValueError(f"data.balance must be one of {BALANCE_MODES}, got {mode!r}")


def balance_weights(groups: np.ndarray, names: Sequence[str], where: str = "") -> np.ndarray:
    """Per-record sampling probabilities that give every non-empty group the same share, and
    logs the distribution before and after."""
    counts = np.bincount(groups, minlength=len(names))
    present = counts > 0
    weights = 1.0 / (present.sum() * counts[groups])
    total = len(groups)
    rows = [f"  {names[g]}: {counts[g]} records, {100 * counts[g] / total:.1f}% -> "
            f"{100 / present.sum():.1f}% of draws" for g in np.flatnonzero(present)]
    missing = [names[g] for g in np.flatnonzero(~present)]
    logger.info("%sbalanced sampling over %d groups (records drawn with replacement):\n%s%s",
                f"{where}: " if where else "", present.sum(), "\n".join(rows),
                f"\n  no records for: {', '.join(missing)}" if missing else "")
    return weights / weights.sum()


def effective_distribution(weights: np.ndarray, groups: np.ndarray, num_groups: int) -> np.ndarray:
    """Each group's expected share of draws under `weights`."""
    return np.bincount(groups, weights=weights, minlength=num_groups)
