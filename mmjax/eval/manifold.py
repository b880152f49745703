"""Precision and recall of a generated set against a real one, by k-NN manifolds in feature
space (Kynkäänniemi et al., 2019).

Each sample's manifold ball has the radius of its k-th nearest neighbour within its own set.
Precision: the fraction of generated samples inside some real sample's ball (are the images
realistic?). Recall: the fraction of real samples inside some generated sample's ball (is the
variety covered?).
"""

from __future__ import annotations

import numpy as np


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T, 0.0)


def _radii(x: np.ndarray, k: int) -> np.ndarray:
    d = _squared_distances(x, x)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def _coverage(queries: np.ndarray, support: np.ndarray, radii: np.ndarray, chunk: int = 1024) -> float:
    inside = [np.any(_squared_distances(queries[i:i + chunk], support) <= radii[None, :], axis=1)
              for i in range(0, len(queries), chunk)]
    return float(np.mean(np.concatenate(inside)))


def precision_recall(real, generated, k: int = 3) -> dict[str, float]:
    real = np.asarray(real, np.float64)
    generated = np.asarray(generated, np.float64)
    if real.ndim != 2 or generated.ndim != 2 or real.shape[1] != generated.shape[1]:
        raise ValueError(f"need two [N, D] feature sets of equal D, got {real.shape} and {generated.shape}")
    if min(len(real), len(generated)) <= k:
        raise ValueError(f"need more than k={k} samples per set")
    return {"precision": _coverage(generated, real, _radii(real, k)),
            "recall": _coverage(real, generated, _radii(generated, k))}
