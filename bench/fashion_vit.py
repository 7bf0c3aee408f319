"""The small ViT the token benchmarks use: torchvision's VisionTransformer on 28 x 28 Fashion-MNIST.

Patches of 4 pixels give 7 x 7 = 49 patch tokens + CLS; 6 layers, width 64, 4 heads, MLP 128, one input
channel: about 0.2M parameters (small enough to train in two epochs on a shared 2-core CPU). `load()` returns the model
trained by `train_fashion_vit.py`. `arch="timm"` is timm's VisionTransformer of the same size (class token, GELU MLP,
pre-norm blocks), trained the same way into its own checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torchvision

from fxcompress.data import fashion_mnist

RESULTS = Path(__file__).parent / "results"
CHECKPOINT = RESULTS / "fashion_vit.pt"
ARCHS = ("torchvision", "timm")
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics


def checkpoint(arch: str = "torchvision") -> Path:
    """The state dict `train_fashion_vit.py --arch arch` writes."""
    return CHECKPOINT if arch == "torchvision" else RESULTS / f"fashion_vit_{_checked(arch)}.pt"


def train_record(arch: str = "torchvision") -> Path:
    """The training record (test accuracy, time, parameters) next to the checkpoint."""
    return checkpoint(arch).with_name(checkpoint(arch).stem + "_train.json")


def build(seed: int = 0, arch: str = "torchvision") -> torch.nn.Module:
    torch.manual_seed(seed)
    if _checked(arch) == "timm":
        return _timm_vit()
    model = torchvision.models.VisionTransformer(image_size=28, patch_size=4, num_layers=6, num_heads=4,
                                                 hidden_dim=64, mlp_dim=128, num_classes=10)
    model.conv_proj = torch.nn.Conv2d(1, 64, kernel_size=4, stride=4)
    return model


def load(arch: str = "torchvision") -> torch.nn.Module:
    path = checkpoint(arch)
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run .venv/bin/python bench/train_fashion_vit.py --arch {arch} first")
    model = build(arch=arch)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def _timm_vit() -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=6,
                             num_heads=4, mlp_ratio=2.0, class_token=True, global_pool="token")


def _checked(arch: str) -> str:
    if arch not in ARCHS:
        raise ValueError(f"unknown ViT arch {arch!r}: choose one of {ARCHS}")
    return arch


def images(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised float images [N, 1, 28, 28] and labels."""
    pixels, labels = fashion_mnist(split)
    return ((pixels.float() / 255 - MEAN) / STD).unsqueeze(1), labels


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    correct = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return correct / len(x)
