"""Kernel distance (KID-style) between two feature sets: the unbiased MMD^2 estimate with the
cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets.

Unbiased: the expectation is exactly 0 when both sets come from one distribution, so values
scatter around 0 (small negatives happen) instead of carrying FD's small-sample bias. Named
"KID-judge" where computed in the CNN judge's features (no Inception weights offline).
"""

from __future__ import annotations

import numpy as np


def _kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def mmd2_unbiased(a: np.ndarray, b: np.ndarray) -> float:
    m, n = len(a), len(b)
    k_aa, k_bb, k_ab = _kernel(a, a), _kernel(b, b), _kernel(a, b)
    term_a = (k_aa.sum() - np.trace(k_aa)) / (m * (m - 1))
    term_b = (k_bb.sum() - np.trace(k_bb)) / (n * (n - 1))
    return float(term_a + term_b - 2.0 * k_ab.mean())


def kernel_distance(features_a, features_b, *, subsets: int = 20, subset_size: int = 500,
                    seed: int = 0) -> dict[str, float]:
    """-> {"kid": mean over subsets, "kid_std": their standard deviation}."""
    a = np.asarray(features_a, np.float64)
    b = np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two [N, D] feature sets of equal D, got {a.shape} and {b.shape}")
    size = min(subset_size, len(a), len(b))
    if size < 2:
        raise ValueError("need at least 2 samples per set")
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(a[rng.choice(len(a), size, replace=False)], b[rng.choice(len(b), size, replace=False)])
              for _ in range(subsets)]
    return {"kid": float(np.mean(values)), "kid_std": float(np.std(values))}
