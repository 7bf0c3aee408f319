"""One-shot selection: the knapsack against brute force, the candidate table and its latency table, the
`oneshot` method through the loop, distillation from the dense step, gradual linearisation."""
import copy
import itertools
import random

import pytest
import torch
import torchvision

import fxcompress
from fxcompress.data import FASHION_MNIST_DIR, fashion_mnist_splits
from fxcompress.finetune.trainer import TrainConfig
from fxcompress.models import with_classes

from loop_models import small_cnn

needs_data = pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST is not installed")
FEW = TrainConfig(max_batches=2, batch_size=16, progress=False)


def tiny_data(size=16):
    return fashion_mnist_splits(size, validation=64, train_samples=96, test_samples=64)


@needs_data
def test_distillation_works_with_dense_epochs():
    """The dense step has no teacher yet: it trains plainly, and the steps after it distil the dense model."""
    config = TrainConfig(distill=0.7, max_batches=2, batch_size=16, progress=False)
    result = fxcompress.prune(small_cnn(), (torch.randn(1, 3, 16, 16),), method="easier", data=tiny_data(),
                              train_config=config, dense_epochs=1, steps=1, progress=False)
    assert [step["step"] for step in result.trajectory.steps] == [0, 1]
