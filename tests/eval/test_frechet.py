import numpy as np
import pytest

from mmjax.eval.frechet import frechet_distance


def test_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu_a, mu_b = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 0.0])
    sd_a, sd_b = np.array([1.0, 2.0, 0.5]), np.array([1.5, 1.0, 0.5])
    a = mu_a + sd_a * rng.standard_normal((200_000, 3))
    b = mu_b + sd_b * rng.standard_normal((200_000, 3))
    # Diagonal covariances: FD = |mu_a - mu_b|^2 + sum (sd_a - sd_b)^2.
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((sd_a - sd_b) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, abs=0.03)


def test_same_distribution_near_zero_and_noise_far():
    rng = np.random.default_rng(1)
    basis = rng.standard_normal((8, 16))
    real = rng.standard_normal((5000, 8)) @ basis
    real2 = rng.standard_normal((5000, 8)) @ basis
    noise = rng.uniform(-3, 3, (5000, 16))
    near, far = frechet_distance(real, real2), frechet_distance(real, noise)
    assert near < 0.5 and far > 20 * max(near, 1e-3)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="equal D"):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))
