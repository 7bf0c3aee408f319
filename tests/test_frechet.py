"""`fxcompress.frechet_distance` against direct computations: scipy's matrix square root on small Gaussian
features, and the closed form for two diagonal Gaussians; zero, symmetry and its errors."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from fxcompress import OptionError, frechet_distance


def gaussian_features(count: int, size: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(size, size, generator=generator, dtype=torch.float64)
    return torch.randn(count, size, generator=generator, dtype=torch.float64) @ mixing + shift


def scipy_distance(a: np.ndarray, b: np.ndarray) -> float:
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cross = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(cross))


def test_equals_scipy_on_small_gaussian_features():
    a, b = gaussian_features(200, 6, seed=0), gaussian_features(150, 6, seed=1, shift=0.5)
    expected = scipy_distance(a.numpy(), b.numpy())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a.float(), b.float()) == pytest.approx(expected, rel=1e-5)


def test_equals_the_closed_form_for_diagonal_gaussians():
    # sample sets whose sample means and unbiased covariances are exactly the chosen ones
    mean_a, mean_b = torch.tensor([0.0, 1.0, -2.0]).double(), torch.tensor([1.0, 1.0, 0.5]).double()
    var_a, var_b = torch.tensor([1.0, 4.0, 0.25]).double(), torch.tensor([9.0, 1.0, 0.25]).double()
    signs = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]],
                         dtype=torch.float64)
    scale = (3 / 4) ** 0.5  # 4 points of +-1 columns have unbiased variance 4/3
    a, b = mean_a + signs * scale * var_a.sqrt(), mean_b + signs * scale * var_b.sqrt()
    expected = ((mean_a - mean_b) ** 2).sum() + ((var_a.sqrt() - var_b.sqrt()) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-9)


def test_zero_for_identical_sets_and_symmetric():
    a, b = gaussian_features(100, 5, seed=2), gaussian_features(80, 5, seed=3)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert frechet_distance(a, b) > 0.1


def test_one_feature_is_the_one_dimensional_distance():
    a, b = gaussian_features(50, 1, seed=4), gaussian_features(60, 1, seed=5, shift=2.0)
    expected = (a.mean() - b.mean()) ** 2 + (a.std() - b.std()) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-9)


@pytest.mark.parametrize("a, b, message", [
    (torch.zeros(4), torch.zeros(4, 2), "2-D"),
    (torch.zeros(4, 2, 1), torch.zeros(4, 2), "2-D"),
    ([[0.0, 1.0]], torch.zeros(4, 2), "2-D"),
    (torch.zeros(4, 2), torch.zeros(4, 3), "same feature size"),
    (torch.zeros(1, 2), torch.zeros(4, 2), "at least 2 samples"),
    (torch.zeros(4, 2), torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), "non-finite"),
    (torch.tensor([[0.0, float("inf")], [1.0, 0.0]]), torch.zeros(4, 2), "non-finite"),
])
def test_refuses_bad_features(a, b, message):
    with pytest.raises(OptionError, match=message):
        frechet_distance(a, b)
