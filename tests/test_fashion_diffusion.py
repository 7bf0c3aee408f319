"""The denoisers and sampler of bench/fashion_diffusion.py: the DDIM loop equals diffusers' DDIMScheduler, the same
seed gives the same images, different seeds different ones, and both denoisers take (x, t, y) tensors."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler

from helpers import one_thread  # noqa: F401 (a fixture)

BENCH = Path(__file__).parents[1] / "bench"


def load_bench():
    spec = importlib.util.spec_from_file_location("fashion_diffusion", BENCH / "fashion_diffusion.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_bench()
pytestmark = pytest.mark.usefixtures("one_thread")


class Wavy(torch.nn.Module):
    """A denoiser that depends on all three inputs (no training needed)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.sin(3 * x + t.reshape(-1, 1, 1, 1) / 100 + y.reshape(-1, 1, 1, 1))


def diffusers_ddim(denoiser, labels: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True,
                              set_alpha_to_one=True, timestep_spacing="leading", steps_offset=0)
    scheduler.set_timesteps(steps)
    x = torch.randn(len(labels), 1, 32, 32, generator=torch.Generator().manual_seed(seed))
    for t in scheduler.timesteps:
        noise = denoiser(x, torch.full((len(labels),), int(t)), labels)
        x = scheduler.step(noise, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    return x


def test_sampler_equals_diffusers_ddim():
    labels = torch.tensor([0, 3, 9])
    ours = bench.sample(Wavy(), labels, steps=10, seed=4)
    assert torch.allclose(ours, diffusers_ddim(Wavy(), labels, 10, 4), atol=1e-5)


@pytest.mark.parametrize("kind", bench.KINDS)
def test_same_seed_same_images_other_seed_other_images(kind):
    denoiser = bench.build(kind, seed=1).eval()
    labels = torch.tensor([1, 7])
    first = bench.sample(denoiser, labels, steps=2, seed=5)
    assert first.shape == (2, 1, 32, 32) and torch.isfinite(first).all()
    assert torch.equal(first, bench.sample(denoiser, labels, steps=2, seed=5))
    assert not torch.allclose(first, bench.sample(denoiser, labels, steps=2, seed=6))


@pytest.mark.parametrize("kind", bench.KINDS)
def test_denoiser_takes_tensors_and_uses_the_class(kind):
    denoiser = bench.build(kind, seed=2).eval()
    with torch.no_grad():  # zero-initialised output layers would hide the inputs' effect
        for parameter in denoiser.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    x, t, y = bench.example_inputs(2)
    with torch.no_grad():
        out = denoiser(x, t, y)
        other = denoiser(x, t, (y + 1) % 10)
    assert out.shape == x.shape
    assert not torch.allclose(out, other)


def test_images_are_padded_to_32_in_minus_one_to_one(monkeypatch):
    pixels = torch.tensor([[[0, 255] * 14] * 28], dtype=torch.uint8)
    monkeypatch.setattr(bench, "fashion_mnist", lambda split: (pixels, torch.tensor([3])))
    x, labels = bench.images("test")
    assert x.shape == (1, 1, 32, 32) and labels.tolist() == [3]
    assert torch.equal(x[0, 0, 2:30, 2:30], pixels[0].float() / 127.5 - 1)
    assert (x[0, 0, :2] == -1).all() and (x[0, 0, :, 30:] == -1).all()
