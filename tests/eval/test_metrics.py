"""KID, k-NN precision/recall, PSNR and SSIM against values computed by hand."""

import numpy as np
import pytest

from mmjax.eval import kernel_distance, precision_recall, psnr, ssim
from mmjax.eval.kid import mmd2_unbiased


def test_kid_is_unbiased_near_zero_on_one_distribution_and_large_between_two():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2000, 16)), rng.standard_normal((2000, 16))
    same = kernel_distance(a, b, subsets=20, subset_size=500)
    # Unbiased: scattered around 0 within a few standard errors, not offset above it.
    assert abs(same["kid"]) < 3 * same["kid_std"] / np.sqrt(20) + 1e-3
    shifted = kernel_distance(a, b + 0.5, subsets=20, subset_size=500)
    assert shifted["kid"] > 20 * max(abs(same["kid"]), same["kid_std"])


def test_mmd_matches_a_hand_computed_case():
    # d = 1, kernel (xy + 1)^3. a = {0, 1}, b = {2}: unbiased within-a term is k(0,1) = 1
    # (mean of the two off-diagonal entries), b has one sample so use two: b = {2, 2}.
    a, b = np.array([[0.0], [1.0]]), np.array([[2.0], [2.0]])
    k_aa = 1.0                      # k(0, 1) = (0 + 1)^3
    k_bb = 125.0                    # k(2, 2) = (4 + 1)^3
    k_ab = (1.0 + 1.0 + 27.0 + 27.0) / 4  # k(0,2)=1, k(1,2)=27
    assert mmd2_unbiased(a, b) == pytest.approx(k_aa + k_bb - 2 * k_ab)


def test_precision_recall_sees_realism_and_coverage_apart():
    rng = np.random.default_rng(1)
    real = rng.standard_normal((600, 4))
    same = precision_recall(real, rng.standard_normal((600, 4)))
    assert same["precision"] > 0.8 and same["recall"] > 0.8
    # Mode collapse: realistic samples of one corner only: high precision, low recall.
    collapsed = precision_recall(real, 0.1 * rng.standard_normal((600, 4)) + np.array([1.0, 1.0, 0, 0]))
    assert collapsed["precision"] > 0.8 and collapsed["recall"] < 0.3
    far = precision_recall(real, rng.standard_normal((600, 4)) + 20.0)
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    with pytest.raises(ValueError, match="equal D"):
        precision_recall(real, real[:, :3])


def test_psnr_and_ssim_against_hand_computed_values():
    a = np.full((1, 16, 16, 3), 100, np.uint8)
    b = np.full((1, 16, 16, 3), 110, np.uint8)
    assert psnr(a, b)[0] == pytest.approx(10 * np.log10(1 / (10 / 255) ** 2))
    assert ssim(a, a)[0] == pytest.approx(1.0)
    # Constant images: no variance, so SSIM is the luminance term alone.
    mu_a, mu_b, c1 = 100 / 255, 110 / 255, 0.01 ** 2
    assert ssim(a, b)[0] == pytest.approx((2 * mu_a * mu_b + c1) / (mu_a ** 2 + mu_b ** 2 + c1))
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    noisy = np.clip(img + rng.normal(0, 40, img.shape), 0, 255).astype(np.uint8)
    assert 0 < ssim(img, noisy).max() < 0.9 and ssim(img, 255 - img).max() < 0
    with pytest.raises(ValueError, match="differ in shape"):
        ssim(img, img[:, :16])
