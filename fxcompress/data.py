"""Real images that install offline: Fashion-MNIST from its IDX files (Debian `dataset-fashion-mnist`).

`read_idx` reads any IDX file (gzipped or not); `fashion_mnist` returns images as uint8 [N, 28, 28] and
labels as int64 [N]; `imagenet_batches` turns them into ImageNet-normalised 3 x size x size batches for
pretrained ImageNet models (real photographs, but of clothing: outside ImageNet's distribution).
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from .errors import MissingDependencyError, OptionError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_SPLITS = {"train": "train", "test": "t10k"}
_DTYPES = {0x08: torch.uint8, 0x09: torch.int8, 0x0B: torch.int16, 0x0C: torch.int32, 0x0D: torch.float32,
           0x0E: torch.float64}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def read_idx(path: str | Path) -> torch.Tensor:
    """The array stored in an IDX file (magic: two zero bytes, a type code, the number of dimensions)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, code, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in _DTYPES:
        raise OptionError(f"{path} is not an IDX file")
    shape = struct.unpack(f">{dims}I", data[4:4 + 4 * dims])
    dtype = _DTYPES[code]
    values = torch.frombuffer(bytearray(data[4 + 4 * dims:]), dtype=dtype)
    if dtype.itemsize > 1:
        values = values.view(torch.uint8).reshape(-1, dtype.itemsize).flip(1).reshape(-1).view(dtype)
    return values.reshape(shape)


def fashion_mnist(split: str = "test", root: str | Path = FASHION_MNIST_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of the `train` (60k) or `test` (10k) split."""
    if split not in _SPLITS:
        raise OptionError(f"unknown split {split!r}; valid: {', '.join(_SPLITS)}")
    prefix = Path(root) / _SPLITS[split]
    images, labels = Path(f"{prefix}-images-idx3-ubyte.gz"), Path(f"{prefix}-labels-idx1-ubyte.gz")
    if not images.is_file() or not labels.is_file():
        raise MissingDependencyError(f"Fashion-MNIST is not at {root}: apt-get install dataset-fashion-mnist")
    return read_idx(images), read_idx(labels).long()


def imagenet_batches(images: torch.Tensor, batch_size: int = 32, size: int = 224) -> Iterator[torch.Tensor]:
    """Grayscale uint8 images [N, H, W] as float batches [B, 3, size, size], ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].float().div(255).unsqueeze(1)
        batch = F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False)
        yield (batch.expand(-1, 3, -1, -1) - mean) / std
