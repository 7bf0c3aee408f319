"""The built-in trainer (`fxcompress.finetune.trainer`) and the training data sets of `fxcompress.data`, checked
against hand-written torch loops, torch's cross-entropy and an independent numpy resize."""
from __future__ import annotations

import math
import copy
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fxcompress import data
from fxcompress.errors import MissingDependencyError, OptionError
from fxcompress.finetune.trainer import TrainConfig, distillation, evaluate, lr_factor, make_optimizer, train

from helpers import one_thread  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def toy_set(samples: int = 96, seed: int = 0) -> TensorDataset:
    """Three classes, each a fixed random 2 x 8 x 8 pattern plus noise: separable."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randn(3, 2, 8, 8, generator=generator)
    labels = torch.arange(samples) % 3
    inputs = patterns[labels] + 0.8 * torch.randn(samples, 2, 8, 8, generator=generator)
    return TensorDataset(inputs, labels)


def tiny_net(channels: int = 2, side: int = 8, dropout: float = 0.2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Dropout(dropout), nn.Linear(8 * side * side, 3))


def quiet(**options) -> TrainConfig:
    return TrainConfig(**{"progress": False, "batch_size": 16, "lr": 0.05, **options})


@pytest.mark.parametrize("options", [{"optimizer": "adam"}, {"schedule": "linear"}, {"lr": 0}, {"lr": -1.0},
                                     {"lr": float("inf")}, {"momentum": 1.0}, {"weight_decay": -0.1},
                                     {"label_smoothing": 1.0}, {"label_smoothing": -0.1},
                                     {"milestones": (0.75, 0.5)}, {"milestones": (0.5, 1.5)},
                                     {"batch_size": 0}, {"batch_size": 2.0}, {"workers": -1},
                                     {"max_batches": 0}, {"amp": "yes"}, {"progress": None}, {"lr": True}])
def test_config_rejects_bad_options(options):
    with pytest.raises(OptionError):
        TrainConfig(**options)


def test_config_round_trips_through_json_and_rejects_unknown_keys():
    config = TrainConfig(optimizer="adamw", schedule="step", milestones=(0.3, 0.6), amp=False, max_batches=3)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(OptionError, match="nesterov"):
        TrainConfig.from_dict({"nesterov": True})


def test_amp_on_cpu_is_an_option_error():
    with pytest.raises(OptionError, match="amp"):
        train(tiny_net(), toy_set(), quiet(amp=True), 1, seed=0, device="cpu")


def test_train_reduces_the_loss_on_a_separable_task():
    model = tiny_net()
    result = train(model, toy_set(), quiet(), 6, seed=0)
    assert result["batches"] == 6 * (96 // 16)
    assert result["epoch_losses"][-1] < 0.3 * result["epoch_losses"][0]
    assert evaluate(model, toy_set(seed=0)).accuracy > 0.95


def random_image_set(samples: int = 48, side: int = 12) -> data.ImageSet:
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (samples, side, side), dtype=torch.uint8, generator=generator)
    return data.ImageSet(images, torch.arange(samples) % 3, size=8, flip=True)


def trained_state(model: nn.Module, dataset, seed: int) -> dict:
    trained = copy.deepcopy(model)
    train(trained, dataset, quiet(), 2, seed=seed)
    return trained.state_dict()


@pytest.mark.parametrize("dataset, channels", [(toy_set(), 2), (random_image_set(), 3)], ids=["tensors", "images"])
def test_training_is_deterministic_in_the_seed(dataset, channels):
    model = tiny_net(channels)
    rng_before = torch.get_rng_state()
    first, again, other = (trained_state(model, dataset, seed) for seed in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), rng_before), "train must leave the caller's RNG as it was"
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["5.weight"], other["5.weight"])
    assert not torch.equal(first["5.weight"], model.state_dict()["5.weight"])


def test_max_batches_caps_every_epoch():
    model = tiny_net()
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    result = train(model, toy_set(), quiet(max_batches=2), 3, seed=0)
    assert result["batches"] == 6 and calls == [16] * 6 and len(result["epoch_losses"]) == 3


def test_a_dataset_without_a_full_batch_is_refused():
    with pytest.raises(OptionError, match="no full batch"):
        train(tiny_net(), toy_set(samples=10), quiet(), 1, seed=0)


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_reported_loss_is_torch_cross_entropy_with_label_smoothing(smoothing):
    """One batch holding the whole set: the reported loss is CE of the untrained model in training mode."""
    dataset = toy_set(samples=32)
    model = tiny_net(dropout=0.0)
    model[5].weight.data.mul_(20)  # confident logits, on which smoothing matters
    reference = copy.deepcopy(model).train()
    inputs, labels = dataset.tensors
    expected = nn.functional.cross_entropy(reference(inputs), labels, label_smoothing=smoothing).item()
    result = train(model, dataset, quiet(batch_size=32, max_batches=1, label_smoothing=smoothing), 1, seed=0)
    assert result["epoch_losses"][0] == pytest.approx(expected, rel=1e-5)
    plain = nn.functional.cross_entropy(reference(inputs), labels).item()
    assert (abs(expected - plain) > 0.01) == (smoothing > 0)


def test_evaluate_matches_a_hand_written_loop_and_restores_the_mode():
    dataset = toy_set(samples=50, seed=3)
    model = tiny_net()
    train(model, toy_set(), quiet(), 1, seed=0)
    model.train()
    inputs, labels = dataset.tensors
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        logits = reference(inputs)
    result = evaluate(model, dataset, batch_size=7)
    assert model.training
    assert result.samples == 50
    assert result.accuracy == (logits.argmax(1) == labels).sum().item() / 50
    assert result.loss == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)
    assert evaluate(model, dataset, batch_size=7, max_batches=2).samples == 14
    with pytest.raises(OptionError, match="max_batches"):
        evaluate(model, dataset, max_batches=0)


def test_learning_rate_schedules_and_weight_decay_groups():
    assert [lr_factor(TrainConfig(), progress) for progress in (0, 0.5, 1)] == pytest.approx([1, 0.5, 0])
    step = TrainConfig(schedule="step", milestones=(0.5, 0.75))
    assert [lr_factor(step, progress) for progress in (0.49, 0.5, 0.8)] == pytest.approx([1, 0.1, 0.01])
    model = tiny_net()
    model[0].bias.requires_grad_(False)
    optimizer = make_optimizer(model, TrainConfig(weight_decay=0.01))
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    expected = {id(p): (0.01 if p.dim() > 1 else 0.0) for p in model.parameters() if p.requires_grad}
    assert decay == expected and id(model[0].bias) not in decay


def test_image_set_checks_its_tensors_and_collate_flips_whole_images():
    with pytest.raises(OptionError, match="uint8"):
        data.ImageSet(torch.zeros(4, 8, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(OptionError, match="int64"):
        data.ImageSet(torch.zeros(4, 8, 8, dtype=torch.uint8), torch.zeros(3, dtype=torch.long))
    dataset = random_image_set(samples=64)
    items = [dataset[index] for index in range(64)]
    plain, labels = data.collate(8)(items)
    torch.manual_seed(0)
    flipped, _ = data.collate(8, flip=True)(items)
    assert plain.shape == (64, 3, 8, 8) and torch.equal(labels, dataset.labels)
    same = (flipped - plain).flatten(1).abs().amax(1) < 1e-5
    mirrored = (flipped - plain.flip(-1)).flatten(1).abs().amax(1) < 1e-5
    assert bool((same | mirrored).all()) and 10 < int(mirrored.sum()) < 54


def numpy_resize_matrix(source: int, target: int) -> np.ndarray:
    """Bilinear, half-pixel centres (align_corners=False), edge-clamped: the weights of each output pixel."""
    matrix = np.zeros((target, source))
    for index in range(target):
        position = max((index + 0.5) * source / target - 0.5, 0.0)
        low = int(np.floor(position))
        high, weight = min(low + 1, source - 1), position - low
        matrix[index, low] += 1 - weight
        matrix[index, high] += weight
    return matrix


def fashion_or_skip(**options) -> data.Splits:
    try:
        return data.fashion_mnist_splits(**options)
    except MissingDependencyError as error:
        pytest.skip(f"Fashion-MNIST not installed: {error}")


def row_keys(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """An exact float64 fingerprint per (image, label): sorted, it compares sets of rows as multisets."""
    weights = torch.randint(1, 2 ** 20, (images[0].numel() + 1,), generator=torch.Generator().manual_seed(0))
    rows = torch.cat([images.flatten(1).double(), labels.double().unsqueeze(1)], 1)
    return (rows @ weights.double()).sort().values


def test_fashion_mnist_splits_partition_the_train_split():
    splits = fashion_or_skip(size=32, validation=5000)
    images, labels = data.fashion_mnist("train")
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (55000, 5000, 10000)
    assert splits.size == 32 and splits.classes == 10
    union = torch.cat([splits.train.images, splits.validation.images]), \
        torch.cat([splits.train.labels, splits.validation.labels])
    assert torch.equal(row_keys(*union), row_keys(images, labels))


def test_fashion_mnist_splits_caps_are_seeded_and_validation_is_disjoint_from_train():
    splits = fashion_or_skip(size=64, validation=500, train_samples=300, test_samples=200, seed=3, flip=True)
    again = fashion_or_skip(size=64, validation=500, train_samples=300, test_samples=200, seed=3)
    other = fashion_or_skip(size=64, validation=500, train_samples=300, test_samples=200, seed=4)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (300, 500, 200)
    assert splits.train.flip and not splits.validation.flip and not splits.test.flip
    assert torch.equal(splits.train.images, again.train.images) and torch.equal(splits.test.labels, again.test.labels)
    assert not torch.equal(splits.validation.images, other.validation.images)
    train_keys, validation_keys = row_keys(splits.train.images, splits.train.labels), \
        row_keys(splits.validation.images, splits.validation.labels)
    assert not np.isin(train_keys.numpy(), validation_keys.numpy()).any()
    with pytest.raises(OptionError, match="validation"):
        data.fashion_mnist_splits(validation=60000)
    with pytest.raises(OptionError, match="train_samples"):
        data.fashion_mnist_splits(validation=59000, train_samples=2000)


def test_fashion_mnist_batches_are_resized_and_imagenet_normalised():
    splits = fashion_or_skip(size=64, validation=10, train_samples=8, test_samples=8)
    batch, labels = data.collate(splits.size)([splits.test[index] for index in range(4)])
    assert batch.shape == (4, 3, 64, 64) and batch.dtype == torch.float32
    assert torch.equal(labels, splits.test.labels[:4])
    resize = numpy_resize_matrix(28, 64)
    mean, std = np.array(data.IMAGENET_MEAN), np.array(data.IMAGENET_STD)
    for index in range(4):
        resized = resize @ (splits.test.images[index].numpy() / 255.0) @ resize.T
        expected = (resized[None] - mean[:, None, None]) / std[:, None, None]
        np.testing.assert_allclose(batch[index].numpy(), expected, atol=1e-5)


def test_distillation_is_hintons_loss_and_needs_a_teacher():
    student, teacher = torch.randn(8, 10), torch.randn(8, 10)
    p, q = (teacher / 4).softmax(1), (student / 4).softmax(1)
    expected = 16 * (p * (p.log() - q.log())).sum(1).mean()
    assert torch.allclose(distillation(student, teacher, 4.0), expected, atol=1e-6)
    with pytest.raises(OptionError, match="teacher"):
        train(tiny_net(), toy_set(), quiet(distill=0.5), 1, seed=0)
    trained = train(tiny_net(), toy_set(), quiet(distill=0.5), 1, seed=0, teacher=tiny_net(seed=1))
    assert math.isfinite(trained["epoch_losses"][0])
