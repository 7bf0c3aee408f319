"""Small models for the fine-tuning loop's tests, importable as `loop_models:FACTORY` by the CLI (run from tests/)."""
from types import SimpleNamespace

import torch
from torch import nn
from torch.utils.data import TensorDataset


def small_cnn() -> nn.Module:
    """conv-BN-ReLU x 4, pooled, then a linear head for 10 classes; seeded, eval mode."""
    torch.manual_seed(0)
    layers, width = [], 3
    for out, stride in ((8, 1), (16, 2), (16, 1), (24, 2)):
        layers += [nn.Conv2d(width, out, 3, stride, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        width = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)).eval()


class Denoiser(nn.Module):
    """A diffusers DiT called as model(noisy, timesteps, labels) -> predicted noise."""

    def __init__(self, dit: nn.Module):
        super().__init__()
        self.dit = dit

    def forward(self, sample, timestep, class_labels):
        return self.dit(sample, timestep=timestep, class_labels=class_labels).sample


def tiny_dit() -> Denoiser:
    """A class-conditional diffusers DiT on 1 x 16 x 16 images: 3 blocks of width 16; seeded, eval mode."""
    from diffusers import DiTTransformer2DModel
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                num_layers=3, sample_size=16, patch_size=4, num_embeds_ada_norm=10, norm_num_groups=8)
    return Denoiser(dit).eval()


def noise_schedule():
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=100)


def denoiser_inputs(batch: int = 8) -> tuple:
    generator = torch.Generator().manual_seed(2)
    return (torch.randn(batch, 1, 16, 16, generator=generator), torch.randint(0, 100, (batch,), generator=generator),
            torch.randint(0, 10, (batch,), generator=generator))


def denoising_task() -> SimpleNamespace:
    """Random 16 x 16 'images' in [-1, 1] with labels, the DiT's example inputs and the DDPM objective (`--data`)."""
    from fxcompress.finetune.objectives import Denoising
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(48, 1, 16, 16, generator=generator) * 2 - 1
    labels = torch.randint(0, 10, (48,), generator=generator)
    return SimpleNamespace(train=TensorDataset(clean, labels), validation=TensorDataset(clean[:16], labels[:16]),
                           test=TensorDataset(clean[16:32], labels[16:32]), example=denoiser_inputs(),
                           objective=Denoising(noise_schedule().alphas_cumprod))
