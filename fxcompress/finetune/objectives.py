"""What the built-in trainer minimises and the loop scores, for models that are not classifiers.

The default (no objective) is classification: cross-entropy in training, accuracy as the score. `Denoising` is
a diffusion model's: the denoiser is called as `model(noisy, timesteps[, labels])` and predicts the noise that
a DDPM forward process added (epsilon prediction); the training loss is the mean squared error at uniformly
drawn timesteps, and the score is minus that error on a split with noise and timesteps fixed by a seed, so
every step of a run is scored on the same draws (higher is better, as the loop expects; a drop of 0.01 is an
increase of the denoising error by 0.01). The noise schedule is given as its cumulative products of alphas
(`alphas_cumprod` of a diffusers scheduler), so fxcompress itself does not need diffusers.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..errors import OptionError


class Objective(Protocol):
    """What the trainer and the loop need of an objective other than classification (`Denoising` is one)."""

    name: str
    seed: int  # the draws of `score` and of the calibration inputs

    def describe(self) -> dict: ...

    def loss(self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...

    def score(self, model: torch.nn.Module, dataset: Dataset | DataLoader, device: torch.device | str = "cpu",
              batch_size: int = 256) -> float: ...

    def model_inputs(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> tuple: ...


class Denoising:
    """The epsilon-prediction objective of a DDPM denoiser on (clean image, label) items."""

    name = "denoising"

    def __init__(self, alphas_cumprod: torch.Tensor, conditional: bool = True, seed: int = 0):
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if alphas_cumprod.dim() != 1 or len(alphas_cumprod) < 1 or not bool(
                ((alphas_cumprod > 0) & (alphas_cumprod <= 1)).all()):
            raise OptionError("alphas_cumprod must be a non-empty 1-D tensor of values in (0, 1]")
        if not isinstance(conditional, bool):
            raise OptionError(f"option 'conditional' must be a bool, got {conditional!r}")
        self.alphas_cumprod, self.conditional, self.seed = alphas_cumprod, conditional, seed

    def describe(self) -> dict:
        return {"name": self.name, "timesteps": len(self.alphas_cumprod), "conditional": self.conditional,
                "seed": self.seed}

    def noised(self, images: torch.Tensor, labels: torch.Tensor,
               generator: torch.Generator | None = None) -> tuple[tuple, torch.Tensor]:
        """(the denoiser's inputs, the noise it should predict) for clean `images`, drawn on the CPU and moved to
        the images' device: from torch's global RNG where `generator` is None, else item by item (a timestep,
        then the noise), so that the draws of an item do not depend on how the items are batched."""
        if generator is None:
            timesteps = torch.randint(len(self.alphas_cumprod), (len(images),))
            noise = torch.randn(images.shape, dtype=images.dtype)
        else:
            draws = [(torch.randint(len(self.alphas_cumprod), (1,), generator=generator),
                      torch.randn(images.shape[1:], generator=generator, dtype=images.dtype)) for _ in images]
            timesteps = torch.cat([t for t, _ in draws])
            noise = torch.stack([n for _, n in draws])
        noise = noise.to(images.device)
        alpha = self.alphas_cumprod[timesteps].to(images.dtype).to(images.device).view(-1, *[1] * (images.dim() - 1))
        noisy = alpha.sqrt() * images + (1 - alpha).sqrt() * noise
        timesteps = timesteps.to(images.device)
        inputs = (noisy, timesteps, labels.to(images.device)) if self.conditional else (noisy, timesteps)
        return inputs, noise

    def model_inputs(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> tuple:
        """The denoiser's inputs for clean `images` (the loop's calibration batches)."""
        return self.noised(images, labels, generator)[0]

    def loss(self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        inputs, noise = self.noised(images, labels)
        return F.mse_loss(model(*inputs).float(), noise.float())

    def score(self, model: torch.nn.Module, dataset: Dataset | DataLoader, device: torch.device | str = "cpu",
              batch_size: int = 256) -> float:
        """Minus the mean squared denoising error over `dataset`, with noise and timesteps drawn from a
        generator seeded by `seed` (the same draws for every model and any batching), in eval mode without
        gradients."""
        loader = dataset if isinstance(dataset, DataLoader) else DataLoader(dataset, batch_size=batch_size)
        generator = torch.Generator().manual_seed(self.seed)
        was_training = model.training
        model.to(device).eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for images, labels in loader:
                inputs, noise = self.noised(images.to(device), labels, generator)
                total += F.mse_loss(model(*inputs).float(), noise.float(), reduction="sum").item()
                count += noise.numel()
        model.train(was_training)
        if count == 0:
            raise OptionError("the denoising score got an empty dataset")
        return -total / count
