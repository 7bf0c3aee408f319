"""The small ViT the token benchmarks use: torchvision's VisionTransformer on 28 x 28 Fashion-MNIST.

Patches of 4 pixels give 7 x 7 = 49 patch tokens + CLS; 6 layers, width 64, 4 heads, MLP 128, one input
channel: about 0.2M parameters (small enough to train in two epochs on a shared 2-core CPU). `load()` returns the model trained by `train_fashion_vit.py`.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torchvision

from fxcompress.data import fashion_mnist

CHECKPOINT = Path(__file__).parent / "results" / "fashion_vit.pt"
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics


def build(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.VisionTransformer(image_size=28, patch_size=4, num_layers=6, num_heads=4,
                                                 hidden_dim=64, mlp_dim=128, num_classes=10)
    model.conv_proj = torch.nn.Conv2d(1, 64, kernel_size=4, stride=4)
    return model


def load() -> torch.nn.Module:
    if not CHECKPOINT.is_file():
        raise SystemExit(f"{CHECKPOINT} is missing: run .venv/bin/python bench/train_fashion_vit.py first")
    model = build()
    model.load_state_dict(torch.load(CHECKPOINT, map_location="cpu", weights_only=True))
    return model.eval()


def images(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised float images [N, 1, 28, 28] and labels."""
    pixels, labels = fashion_mnist(split)
    return ((pixels.float() / 255 - MEAN) / STD).unsqueeze(1), labels


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    correct = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return correct / len(x)
