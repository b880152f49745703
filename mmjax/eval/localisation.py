"""Does a word's attention sit on the object it names?

For each test caption, a generator with per-word cross-attention maps (`model.attention_maps`)
makes one image; the object's box is found in that image (the `shapes` background is black),
and the colour word's and the shape word's maps are scored by the share of their mass inside
the box divided by the box's share of the image: 1 is no better than a uniform map, and the
bar for a model that understands the word is 3.
"""

from __future__ import annotations

import numpy as np

from mmjax.data.shapes import COLOR_NAMES, SHAPES
from mmjax.sampling.attention_maps import localisation_score

# A pixel brighter than this in some channel belongs to the object (every shapes color is).
OBJECT_THRESHOLD = 40


def object_boxes(images: np.ndarray, threshold: int = OBJECT_THRESHOLD) -> np.ndarray:
    """`[N, 4]` float boxes `(x0, y0, x1, y1)` (pixel i covers [i, i + 1)) around the pixels of
    uint8 `images` `[N, H, W, 3]` brighter than `threshold`; NaN where an image has none."""
    boxes = np.full((len(images), 4), np.nan, np.float32)
    for i, image in enumerate(np.asarray(images)):
        ys, xs = np.nonzero(image.max(axis=-1) > threshold)
        if len(xs):
            boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return boxes


def _word_index(words: list[str], vocabulary) -> int | None:
    for i, word in enumerate(words):
        if word.lower() in vocabulary:
            return i
    return None


def attention_localisation(model, captions: list[str], *, batch_size: int = 50, seed: int = 0,
                           **options) -> dict:
    """Mean localisation score of the colour word's and the shape word's maps over `captions`
    (one image each), as `{"color_word", "shape_word", "num"}`; captions without the word, or
    images without an object, are left out of that word's mean (and counted in `num_*`)."""
    scores: dict[str, list[float]] = {"color_word": [], "shape_word": []}
    for start in range(0, len(captions), batch_size):
        batch = list(captions[start:start + batch_size])
        results = model.attention_maps(batch, seed=seed + start, **options)
        boxes = object_boxes(np.concatenate([r.images for r in results]))
        for result, box in zip(results, boxes):
            if np.isnan(box).any():
                continue
            for name, vocabulary in (("color_word", COLOR_NAMES), ("shape_word", SHAPES)):
                index = _word_index(result.words, vocabulary)
                if index is not None:
                    score = localisation_score(result.maps[0, index][None], box[None])
                    scores[name].append(float(np.asarray(score)[0]))
    out = {name: float(np.mean(values)) if values else float("nan") for name, values in scores.items()}
    out.update({f"num_{name}": len(values) for name, values in scores.items()})
    out["num"] = len(captions)
    return out
