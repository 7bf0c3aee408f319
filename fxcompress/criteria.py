"""The criteria's math, no FX: activation-state entropy, Gaussian ON/OFF states, max-sliced Wasserstein.

- Entropy (EASIER, EGP/NEPENTHE): p_on(c) = mean over batch and positions of 1[z >= threshold] for the
  activation input z; h(c) = -p log2 p - (1 - p) log2 (1 - p); the layer entropy is the mean over channels.
  The EGP variant averages only over channels whose state is not constant within every batch.
- Gaussian states (TLC): a channel z ~ N(mu, sigma^2) is off below the activation's lower kink, saturated
  above its upper kink (ReLU6) and linear between; the error of the likeliest call is 1 - its probability,
  which for ReLU is Phi(-|mu| / sigma).
- Block distance (LaCoOT): max-sliced Wasserstein distance between block input and output, each sample
  flattened, the batch as the empirical distribution; differentiable through torch tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import MissingDependencyError

OFF, ON, SATURATED = "off", "on", "saturated"


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of a Bernoulli(p), 0 at p = 0 and p = 1."""
    p = p.double()
    terms = -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p)) / math.log(2)
    return terms.clamp(min=0)


@dataclass(frozen=True)
class ActivationStats:
    p_on: torch.Tensor  # [C] fraction of positions with z >= threshold
    entropy: torch.Tensor  # [C] bits
    constant: torch.Tensor  # [C] bool: the state never changed within a batch
    mean: torch.Tensor  # [C] of z
    std: torch.Tensor  # [C] of z
    samples: int  # positions per channel seen

    @property
    def layer_entropy(self) -> float:
        return float(self.entropy.mean())

    @property
    def layer_entropy_egp(self) -> float:
        """Mean entropy over the channels that are not constant within a batch (0 if there are none)."""
        varying = self.entropy[~self.constant]
        return float(varying.mean()) if varying.numel() else 0.0


class ChannelStatistics:
    """Streaming per-channel statistics of an activation input; memory O(channels) for any number of batches."""

    def __init__(self, threshold: float = 0.0):
        self.threshold = threshold
        self.on = self.total = self.sum = self.squares = self.constant = None
        self.samples = 0

    def update(self, z: torch.Tensor, axis: int) -> None:
        """Add one batch; `axis` is the channel axis of z."""
        z = z.detach().movedim(axis, -1)
        z = z.reshape(-1, z.shape[-1]).double()
        on = z >= self.threshold
        constant = on.all(0) | (~on).all(0)
        if self.on is None:
            self.on, self.sum, self.squares = on.sum(0), z.sum(0), (z * z).sum(0)
            self.constant = constant
        else:
            self.on += on.sum(0)
            self.sum += z.sum(0)
            self.squares += (z * z).sum(0)
            self.constant &= constant
        self.samples += z.shape[0]

    def result(self) -> ActivationStats:
        p_on = self.on.double() / self.samples
        mean = self.sum / self.samples
        std = (self.squares / self.samples - mean * mean).clamp(min=0).sqrt()
        return ActivationStats(p_on, binary_entropy(p_on), self.constant.clone(), mean, std, self.samples)


@dataclass(frozen=True)
class ChannelStates:
    p_off: torch.Tensor  # [C] P(z < low)
    p_saturated: torch.Tensor  # [C] P(z > high), 0 without an upper kink
    error: torch.Tensor  # [C] probability that the likeliest state is wrong
    source: str  # "batch_norm" (data-free) or "calibration"

    def states(self) -> list[str]:
        p_on = 1 - self.p_off - self.p_saturated
        stacked = torch.stack([self.p_off, p_on, self.p_saturated])
        return [(OFF, ON, SATURATED)[i] for i in stacked.argmax(0).tolist()]


def gaussian_states(mean: torch.Tensor, std: torch.Tensor, low: float, high: float = math.inf,
                    source: str = "batch_norm") -> ChannelStates:
    """States of channels z ~ N(mean, std^2) under an activation linear on [low, high]."""
    mean, std = mean.double(), std.double().abs()
    degenerate = std == 0
    safe = torch.where(degenerate, torch.ones_like(std), std)
    p_off = torch.where(degenerate, (mean < low).double(), torch.special.ndtr((low - mean) / safe))
    if math.isinf(high):
        p_saturated = torch.zeros_like(mean)
    else:
        p_saturated = torch.where(degenerate, (mean > high).double(), torch.special.ndtr((mean - high) / safe))
    p_on = (1 - p_off - p_saturated).clamp(min=0)
    error = 1 - torch.stack([p_off, p_on, p_saturated]).max(0).values
    return ChannelStates(p_off, p_saturated, error.clamp(min=0), source)


def block_distance(x: torch.Tensor, y: torch.Tensor, projections: int = 50, p: int = 2,
                   seed: int | None = 0) -> torch.Tensor:
    """Max-sliced Wasserstein distance between the samples of x and y (each flattened); differentiable, with a
    zero gradient where the distance is 0 (POT's p-th root would give 0 * inf = nan there). `seed` seeds POT's
    own generator for the random projections (torch's global one is left alone); None draws them unseeded."""
    try:
        import ot
    except ImportError as error:
        raise MissingDependencyError("the block distance needs POT: pip install 'fxcompress[criteria]'") from error
    _, log = ot.max_sliced_wasserstein_distance(x.flatten(1), y.flatten(1), n_projections=projections, p=p,
                                                seed=seed, log=True)
    largest = log["projected_emds"].max()
    nonzero = largest != 0  # nan and inf pass through
    root = torch.where(nonzero, largest, torch.ones_like(largest)) ** (1.0 / p)
    return torch.where(nonzero, root, torch.zeros_like(root))
