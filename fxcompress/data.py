"""Real images that install offline: Fashion-MNIST from its IDX files (Debian `dataset-fashion-mnist`).

`read_idx` reads any IDX file (gzipped or not); `fashion_mnist` returns images as uint8 [N, 28, 28] and
labels as int64 [N]; `to_imagenet_batch` turns them into ImageNet-normalised 3 x size x size batches for
pretrained ImageNet models (real photographs, but of clothing: outside ImageNet's distribution), and
`imagenet_batches` iterates over such batches. For training, `ImageSet` keeps the uint8 images (small in memory,
cheap to pickle into loader workers) and `collate` converts each batch; `fashion_mnist_splits` gives the
train / validation / test sets, the validation set carved from the train split.
"""
from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

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


def fashion_mnist(split: str = "test", root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of the `train` (60k) or `test` (10k) split."""
    if split not in _SPLITS:
        raise OptionError(f"unknown split {split!r}; valid: {', '.join(_SPLITS)}")
    root = FASHION_MNIST_DIR if root is None else root
    prefix = Path(root) / _SPLITS[split]
    images, labels = Path(f"{prefix}-images-idx3-ubyte.gz"), Path(f"{prefix}-labels-idx1-ubyte.gz")
    if not images.is_file() or not labels.is_file():
        raise MissingDependencyError(f"Fashion-MNIST is not at {root}: apt-get install dataset-fashion-mnist")
    return read_idx(images), read_idx(labels).long()


def to_imagenet_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """Grayscale uint8 images [B, H, W] as a float batch [B, 3, size, size]: bilinear resize, ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)
    batch = images.float().div(255).unsqueeze(1)
    batch = F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False)
    return (batch.expand(-1, 3, -1, -1) - mean) / std


def imagenet_batches(images: torch.Tensor, batch_size: int = 32, size: int = 224) -> Iterator[torch.Tensor]:
    """Grayscale uint8 images [N, H, W] as float batches [B, 3, size, size], ImageNet-normalised."""
    for start in range(0, len(images), batch_size):
        yield to_imagenet_batch(images[start:start + batch_size], size)


class ImageSet(torch.utils.data.Dataset):
    """Grayscale uint8 images [N, H, W] with int64 labels [N]; an item is (uint8 image, label).

    `size` is the side of the batches that `collate(size)` makes from its items; `flip` asks the trainer for
    random horizontal flips (training augmentation; `evaluate` never flips).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, size: int = 64, flip: bool = False) -> None:
        if images.dtype != torch.uint8 or images.dim() != 3:
            raise OptionError(f"ImageSet images must be uint8 [N, H, W], got {images.dtype} {list(images.shape)}")
        if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
            raise OptionError(f"ImageSet labels must be int64 [{len(images)}], got {labels.dtype} "
                              f"{list(labels.shape)}")
        check_count("size", size)
        self.images, self.labels, self.size, self.flip = images, labels, size, flip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def subset(self, indices: torch.Tensor, flip: bool | None = None) -> "ImageSet":
        """The items at `indices` (same size; same flip unless given)."""
        return ImageSet(self.images[indices], self.labels[indices], self.size, self.flip if flip is None else flip)


def collate(size: int, flip: bool = False) -> Callable[[Sequence[tuple[torch.Tensor, torch.Tensor]]],
                                                        tuple[torch.Tensor, torch.Tensor]]:
    """A DataLoader `collate_fn` turning ImageSet items into (float [B, 3, size, size], int64 labels [B]) as
    `to_imagenet_batch` does; with `flip`, each image is mirrored left-right with probability 1/2, drawn from
    torch's global generator (which loader workers seed from the loader's generator)."""
    return partial(_collate_images, size=size, flip=flip)


def _collate_images(items: Sequence[tuple[torch.Tensor, torch.Tensor]], size: int,
                    flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([image for image, _ in items])
    labels = torch.stack([torch.as_tensor(label) for _, label in items])
    if flip:
        mirrored = torch.rand(len(images)) < 0.5
        images = torch.where(mirrored.reshape(-1, 1, 1), images.flip(-1), images)
    return to_imagenet_batch(images, size), labels


@dataclass(frozen=True)
class Splits:
    """Train, validation (carved from the train split) and test sets of one data set, at one resolution
    (ImageSets of images, or TensorDatasets: of flattened vectors, for example)."""

    train: ImageSet | TensorDataset
    validation: ImageSet | TensorDataset
    test: ImageSet | TensorDataset
    size: int
    classes: int = 10


    def task(self, example, objective=None) -> "Task":
        """These splits as a `Task`, with the model's example inputs (and an objective other than
        classification)."""
        return Task(self.train, self.validation, self.test, tuple(example), objective)


@dataclass(frozen=True)
class Task:
    """What the fine-tuning loop trains and scores on: `prune(model, task.example, data=task,
    objective=task.objective)`, and what the factory of `fxcompress prune --data package.module:factory` returns.

    train, validation, test: datasets of (input, label) items (batched and shuffled by the built-in trainer), or
        DataLoaders, used as they are;
    example: the model's example inputs, a tuple (capture and the plan's call sites are found with them);
    objective: None to classify (cross-entropy, accuracy), or `fxcompress.finetune.objectives.Denoising` for a
        diffusion denoiser.

    For example, `fashion_mnist_splits(64).task((torch.randn(1, 3, 64, 64),))`, or
    `Task(TensorDataset(x, y), TensorDataset(vx, vy), TensorDataset(tx, ty), example=(x[:1],))`.
    """

    train: Dataset | DataLoader
    validation: Dataset | DataLoader
    test: Dataset | DataLoader
    example: tuple
    objective: object = None


def fashion_mnist_splits(size: int = 64, validation: int = 5000, train_samples: int | None = None,
                         test_samples: int | None = None, seed: int = 0, flip: bool = False,
                         root: str | Path | None = None) -> Splits:
    """Fashion-MNIST as train / validation / test ImageSets of `size` x `size` batches.

    The validation set is the first `validation` images of a permutation of the 60k train split seeded by
    `seed`; the train set is the rest (disjoint), capped to its first `train_samples` when given. The test set is
    the 10k test split, or `test_samples` of it drawn with the same seed. `flip` turns on random horizontal
    flips on the train set only. Raises MissingDependencyError when the data set is not installed.
    """
    check_count("size", size)
    train_images, train_labels = fashion_mnist("train", root)
    test_images, test_labels = fashion_mnist("test", root)
    check_count("validation", validation, len(train_labels) - 1)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_labels), generator=generator)
    source = ImageSet(train_images, train_labels, size)
    rest = order[validation:]
    if train_samples is not None:
        rest = rest[:check_count("train_samples", train_samples, len(rest))]
    test = ImageSet(test_images, test_labels, size)
    if test_samples is not None:
        check_count("test_samples", test_samples, len(test))
        test = test.subset(torch.randperm(len(test), generator=generator)[:test_samples])
    return Splits(source.subset(rest, flip=flip), source.subset(order[:validation]), test, size)


def check_count(name: str, value: object, maximum: int | None = None) -> int:
    """`value` where it is a positive integer (at most `maximum`), else an OptionError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionError(f"{name} must be a positive integer, got {value!r}")
    if maximum is not None and value > maximum:
        raise OptionError(f"{name} must be at most {maximum}, got {value}")
    return value
