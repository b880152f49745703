"""Attribute accuracy: does an image show the shape, color, size and position it was asked for?

The judge is a CNN-family model trained on `shapes` (configs/cnn_shapes.py); its accuracy on
the real test split is the ceiling of what these numbers can mean.
"""

from __future__ import annotations

import numpy as np

ATTRIBUTES = ("shape", "color", "size", "position")


def attribute_accuracy(images, labels: dict, judge, *, batch_size: int = 256,
                       mask=None) -> dict[str, float]:
    """Fraction of images whose judged attribute equals the label, per attribute.

    images: uint8 [N, H, W, 3] (or floats in [-1, 1]). labels: attribute -> int array [N], where
    a negative label means "not asked for" and is left out of that attribute's score.
    judge: a loaded classifier (`mmjax.load(path)` of a CNN judge: anything with `classify`).
    `mask` (bool [N]) restricts the scored images.
    Returns `{attribute: accuracy}` plus `{attribute}_count` with how many images were scored.
    """
    if not callable(getattr(judge, "classify", None)):
        raise ValueError(f"judge must be a loaded classifier (mmjax.load(<judge path>)), got {judge!r}")
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
