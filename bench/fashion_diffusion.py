"""Two small class-conditional diffusion denoisers on Fashion-MNIST (padded to 32 x 32, pixels in [-1, 1]).

`unet` is a diffusers `UNet2DModel` (channels 16/32/64 at 32/16/8 px, one resnet per level on the way down, two
on the way up, self-attention at 16 x 16 and in the middle block; 0.65M parameters), `dit` a diffusers
`DiTTransformer2DModel` (patch 4: 64 tokens, width 96 = 4 heads x 24, 6 blocks; 1.2M parameters, nearly half of them in
each block's own adaLN-Zero conditioning MLP); both predict the noise of a DDPM (1000 steps, linear betas) and
are sized to train on a loaded 2-core CPU within 30 minutes. `Denoiser` wraps either as `forward(sample, timestep,
class_labels) -> noise`, tensors in and out, so that fxcompress captures it with example inputs (x, t, y).
`sample` runs a deterministic DDIM sampler (eta 0) in plain torch around any such callable: its noise comes from a
generator seeded by `seed` alone, so two denoisers given the same seed start from the same noise.
`load(kind)` returns the denoiser trained by `train_diffusion.py`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DModel

from fxcompress.data import fashion_mnist

RESULTS = Path(__file__).parent / "results" / "diffusion"
KINDS = ("unet", "dit")
CLASSES = 10
SIZE = 32
TRAIN_STEPS = 1000
SAMPLE_STEPS = 50


def images(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Float images [N, 1, 32, 32] in [-1, 1] (28 x 28 padded with background, -1) and int64 labels [N]."""
    pixels, labels = fashion_mnist(split)
    x = pixels.float().div(127.5).sub(1).unsqueeze(1)
    return F.pad(x, (2, 2, 2, 2), value=-1.0), labels


def _unet() -> UNet2DModel:
    return UNet2DModel(sample_size=SIZE, in_channels=1, out_channels=1, block_out_channels=(16, 32, 64),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=32,
                       norm_num_groups=8, num_class_embeds=CLASSES)


def _dit() -> DiTTransformer2DModel:
    # out_channels 1: noise only (no learned variance); its label table has an 11th, null, class that diffusers
    # draws for 10 % of the labels in train mode (eval mode never drops)
    return DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=24, in_channels=1, out_channels=1,
                                 num_layers=6, sample_size=SIZE, patch_size=4, num_embeds_ada_norm=CLASSES,
                                 norm_num_groups=1)


_BUILDERS = {"unet": _unet, "dit": _dit}


class Denoiser(torch.nn.Module):
    """A diffusers denoiser as `forward(sample [N,1,32,32], timestep int64 [N], class_labels int64 [N]) -> noise`."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return self.model(sample, timestep, class_labels=class_labels, return_dict=False)[0]


def build(kind: str, seed: int = 0) -> Denoiser:
    """A freshly initialised denoiser of `kind` ("unet" or "dit")."""
    if kind not in _BUILDERS:
        raise SystemExit(f"unknown denoiser {kind!r}; valid: {', '.join(KINDS)}")
    torch.manual_seed(seed)
    return Denoiser(_BUILDERS[kind]())


def checkpoint(kind: str) -> Path:
    return RESULTS / f"{kind}.pt"


def load(kind: str) -> Denoiser:
    """The trained denoiser of `kind` (EMA weights), in eval mode."""
    path = checkpoint(kind)
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run .venv/bin/python bench/train_diffusion.py {kind} first")
    denoiser = build(kind)
    denoiser.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return denoiser.eval()


def scheduler() -> DDPMScheduler:
    """The training noise schedule: 1000 steps, linear betas, epsilon prediction."""
    return DDPMScheduler(num_train_timesteps=TRAIN_STEPS, beta_schedule="linear", prediction_type="epsilon")


def example_inputs(count: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sample, timestep, class_labels) of `count` items, as `Denoiser.forward` takes them (for capture)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 1, SIZE, SIZE, generator=generator)
    t = torch.randint(0, TRAIN_STEPS, (count,), generator=generator)
    return x, t, torch.arange(count) % CLASSES


def ddim_timesteps(steps: int) -> list[int]:
    """The `steps` timesteps of the sampler, evenly spaced ("leading" spacing), largest first."""
    if not 1 <= steps <= TRAIN_STEPS:
        raise SystemExit(f"steps must be in 1..{TRAIN_STEPS}, got {steps}")
    ratio = TRAIN_STEPS // steps
    return [step * ratio for step in reversed(range(steps))]


@torch.no_grad()
def sample(denoiser: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], labels: torch.Tensor,
           steps: int = SAMPLE_STEPS, seed: int = 0) -> torch.Tensor:
    """Images [N, 1, 32, 32] in [-1, 1] of classes `labels` [N] by DDIM with eta 0 (deterministic): the
    initial noise is drawn from a generator seeded by `seed`, the predicted clean image is clipped to [-1, 1]."""
    alphas = scheduler().alphas_cumprod.double()
    labels = labels.long()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(len(labels), 1, SIZE, SIZE, generator=generator)
    timesteps = ddim_timesteps(steps)
    for index, t in enumerate(timesteps):
        alpha = alphas[t]
        alpha_prev = alphas[timesteps[index + 1]] if index + 1 < len(timesteps) else torch.tensor(1.0).double()
        noise = denoiser(x, torch.full((len(labels),), t, dtype=torch.long), labels).double()
        clean = ((x.double() - (1 - alpha).sqrt() * noise) / alpha.sqrt()).clamp(-1, 1)
        noise = (x.double() - alpha.sqrt() * clean) / (1 - alpha).sqrt()
        x = (alpha_prev.sqrt() * clean + (1 - alpha_prev).sqrt() * noise).float()
    return x
