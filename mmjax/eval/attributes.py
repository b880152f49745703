"""Attribute accuracy: does an image show the shape, color, size and position it was asked for?

The judge is a CNN-family model trained on `shapes` (configs/cnn_shapes.py); its accuracy on
the real test split is the ceiling of what these numbers can mean.
"""

from __future__ import annotations

import functools

import numpy as np

ATTRIBUTES = ("shape", "color", "size", "position")


@functools.lru_cache(maxsize=4)
def _load_judge(workdir: str):
    from mmjax import api

    judge = api.load(workdir)
    if "classify" not in judge.abilities:
        raise ValueError(f"{workdir!r} holds a {judge.config.family!r} model, not a classifier judge")
    return judge


def attribute_accuracy(images, labels: dict, judge, *, batch_size: int = 256,
                       mask=None) -> dict[str, float]:
    """Fraction of images whose judged attribute equals the label, per attribute.

    images: uint8 [N, H, W, 3] (or floats in [-1, 1]). labels: attribute -> int array [N], where
    a negative label means "not asked for" and is left out of that attribute's score.
    judge: a workdir path or a loaded classifier. `mask` (bool [N]) restricts the scored images.
    Returns `{attribute: accuracy}` plus `{attribute}_count` with how many images were scored.
    """
    judge = _load_judge(judge) if isinstance(judge, str) else judge
    images = np.asarray(images)
    predictions: dict[str, list] = {}
    for start in range(0, len(images), batch_size):
        for key, value in judge.classify(images[start:start + batch_size]).items():
            predictions.setdefault(key, []).append(value)
    results = {}
    for attribute, wanted in labels.items():
        if attribute not in predictions:
            raise KeyError(f"the judge has no {attribute!r} head; it has {sorted(predictions)}")
        wanted = np.asarray(wanted)
        predicted = np.concatenate(predictions[attribute])
        scored = wanted >= 0 if mask is None else (wanted >= 0) & np.asarray(mask)
        count = int(scored.sum())
        results[attribute] = float(np.mean(predicted[scored] == wanted[scored])) if count else float("nan")
        results[f"{attribute}_count"] = count
    return results
