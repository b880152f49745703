"""Reconstruction metrics on uint8 images: PSNR and SSIM (on the [0, 1] scale), per image."""

from __future__ import annotations

import numpy as np

SSIM_K1, SSIM_K2 = 0.01, 0.03


def _float(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise ValueError(f"expected images [N, H, W, C], got shape {images.shape}")
    return images.astype(np.float64) / 255.0 if images.dtype == np.uint8 else images.astype(np.float64)


def psnr(a, b) -> np.ndarray:
    a, b = _float(a), _float(b)
    if a.shape != b.shape:
        raise ValueError(f"image sets differ in shape: {a.shape} vs {b.shape}")
    mse = np.mean(np.square(a - b), axis=(1, 2, 3))
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-10))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def _blur(x: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering over H and W of [N, H, W, C]."""
    k = len(window)
    h = sum(window[i] * x[:, i:x.shape[1] - k + 1 + i] for i in range(k))
    return sum(window[i] * h[:, :, i:h.shape[2] - k + 1 + i] for i in range(k))


def ssim(a, b, *, window_size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Mean SSIM per image (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03),
    averaged over channels. Images smaller than the window use a window of their size."""
    a, b = _float(a), _float(b)
    if a.shape != b.shape:
        raise ValueError(f"image sets differ in shape: {a.shape} vs {b.shape}")
    size = min(window_size, a.shape[1], a.shape[2])
    window = _gaussian_window(size, sigma)
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    mu_a, mu_b = _blur(a, window), _blur(b, window)
    var_a = _blur(a * a, window) - mu_a ** 2
    var_b = _blur(b * b, window) - mu_b ** 2
    cov = _blur(a * b, window) - mu_a * mu_b
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return value.mean(axis=(1, 2, 3))
