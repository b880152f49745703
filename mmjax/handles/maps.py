"""Per-word attention maps drawn for people: each image, then one labelled heat map per word."""

from __future__ import annotations

import numpy as np

from mmjax.images import make_grid


def heat_overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """uint8 RGB: the image in grey, dimmed, under the map stretched from its minimum to its
    maximum in black-red-yellow-white, so the brightest place is where the word looks most."""
    grey = image.astype(np.float32).mean(axis=-1, keepdims=True) / 255.0
    h = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-12)
    colour = np.stack([np.clip(3 * h, 0, 1), np.clip(3 * h - 1, 0, 1), np.clip(3 * h - 2, 0, 1)], axis=-1)
    return np.clip(255 * (0.3 * grey + 0.7 * colour), 0, 255).astype(np.uint8)


def attention_grid(results, captions=None):
    """`AttentionMaps` results (from `model.attention_maps`) -> one PIL image: a row per
    sample, the image (captioned with `captions[i]`, default "") then each word's map."""
    captions = captions or [None] * len(results)
    rows = [([image] + [heat_overlay(image, m) for m in maps], [caption or ""] + list(result.words))
            for result, caption in zip(results, captions) for image, maps in zip(result.images, result.maps)]
    width = max(len(cells) for cells, _ in rows)
    blank = np.zeros_like(rows[0][0][0])
    cells, labels = [], []
    for row, names in rows:
        cells += row + [blank] * (width - len(row))
        labels += names + [""] * (width - len(row))
    return make_grid(np.stack(cells), ncols=width, captions=labels)
