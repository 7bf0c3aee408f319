"""The Fréchet distance between two Gaussians fitted to two sets of feature vectors.

With means mu_a, mu_b and unbiased covariances S_a, S_b of features [N, F] and [M, F],

    d^2 = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2),

the squared 2-Wasserstein distance between the two Gaussians. It measures a generator against real images in the
feature space of whatever network produced the features (here a classifier trained on the same data, so the
numbers are comparable only with each other, not with published scores in another feature space). Computed in
float64; the symmetric positive semi-definite square roots come from eigendecompositions, with round-off negative
eigenvalues clamped to zero.
"""
from __future__ import annotations

import torch

from .errors import OptionError


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """The Fréchet distance d^2 between Gaussians fitted to `features_a` [N, F] and `features_b` [M, F]."""
    a, b = _checked("features_a", features_a), _checked("features_b", features_b)
    if a.shape[1] != b.shape[1]:
        raise OptionError(f"features_a and features_b must have the same feature size, got {a.shape[1]} "
                          f"and {b.shape[1]}")
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _psd_sqrt(cov_a)
    cross = _psd_sqrt(root_a @ cov_b @ root_a)
    distance = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross.trace()
    return max(distance.item(), 0.0)


def _checked(name: str, features: torch.Tensor) -> torch.Tensor:
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        shape = list(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise OptionError(f"{name} must be a 2-D tensor [samples, features], got {shape}")
    if features.shape[0] < 2 or features.shape[1] < 1:
        raise OptionError(f"{name} needs at least 2 samples and 1 feature, got {list(features.shape)}")
    features = features.detach().to("cpu", torch.float64)
    if not torch.isfinite(features).all():
        raise OptionError(f"{name} has non-finite values")
    return features


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """The square root of a symmetric positive semi-definite matrix."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T
