"""Small models for the fine-tuning loop's tests, importable as `loop_models:FACTORY` by the CLI (run from tests/)."""
import torch
from torch import nn


def small_cnn() -> nn.Module:
    """conv-BN-ReLU x 4, pooled, then a linear head for 10 classes; seeded, eval mode."""
    torch.manual_seed(0)
    layers, width = [], 3
    for out, stride in ((8, 1), (16, 2), (16, 1), (24, 2)):
        layers += [nn.Conv2d(width, out, 3, stride, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        width = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)).eval()
