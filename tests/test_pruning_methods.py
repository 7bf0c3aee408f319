"""Unstructured pruning on the loop (EGP, global magnitude, DSD²): EGP's budget split against a direct
computation, magnitude masks against torch.nn.utils.prune and, over every layer of LeNet-300-100, against a sort
of all weight magnitudes, masks that persist through fine-tuning and resume, layers driven to zero entropy
collapsed exactly, rewinding to the initial weights, and each method's loop on real Fashion-MNIST batches."""
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import fxcompress
from fxcompress import OptionError, compress
from fxcompress.cli import main as cli_main
from fxcompress.data import FASHION_MNIST_DIR, Splits, fashion_mnist_splits
from fxcompress.finetune.methods import Egp, Magnitude, StepInputs
from fxcompress.finetune.run_folder import RunFolder
from fxcompress.finetune.sparsity import (effective_weight, egp_amounts, global_magnitude_masks, layer_magnitude_masks,
                                          masks_of, plain_state_dict, rewind, set_masks)
from fxcompress.finetune.trainer import TrainConfig, train
from fxcompress.models import torchvision_model, with_classes
from fxcompress.plan import Plan
from fxcompress.trainable import apply_plan, plan_of

from helpers import randomize_batchnorm
from loop_models import small_cnn

FEW = TrainConfig(max_batches=2, batch_size=16, progress=False)
X16 = (torch.randn(1, 3, 16, 16),)
needs_data = pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST is not installed")


def direct_egp_split(scores, unpruned, rate):
    """EGP's split as the paper states it: softmax over layers of sum(S)/S_l; any layer whose share exceeds its
    weights is pruned whole, and the split starts over on the others with what is left."""
    budget, active, fixed = rate * sum(unpruned[k] for k in scores), dict(scores), {}
    while True:
        total = sum(active.values())
        logits = torch.tensor([total / s for s in active.values()], dtype=torch.float64)
        shares = dict(zip(active, (budget * torch.softmax(logits, 0)).tolist()))
        over = {k for k, share in shares.items() if share > unpruned[k]}
        if not over:
            return {**fixed, **shares}
        for k in over:
            fixed[k] = unpruned[k]
            budget -= unpruned[k]
            del active[k]


def test_the_egp_split_is_the_softmax_of_inverse_scores_with_caps_redistributed():
    scores = {"a": 0.5, "b": 1.0, "c": 2.0, "d": 4.0}
    roomy = {"a": 10_000, "b": 10_000, "c": 10_000, "d": 10_000}
    amounts = egp_amounts(scores, roomy, 0.5)
    assert amounts == pytest.approx(direct_egp_split(scores, roomy, 0.5), rel=1e-12)
    assert sum(amounts.values()) == pytest.approx(20_000)
    assert amounts["a"] > amounts["b"] > amounts["c"] > amounts["d"]  # lowest entropy x magnitude pruned most
    small = {"a": 300, "b": 10_000, "c": 10_000, "d": 10_000}  # "a" would take far more than it holds
    capped = egp_amounts(scores, small, 0.5)
    assert capped["a"] == 300
    assert capped == pytest.approx(direct_egp_split(scores, small, 0.5), rel=1e-12)
    assert sum(capped.values()) == pytest.approx(0.5 * 30_300)
    with pytest.raises(OptionError):
        egp_amounts({"a": 0.0}, {"a": 10}, 0.5)


def test_magnitude_masks_equal_torch_prune():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
    reference = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
    reference.load_state_dict(model.state_dict())
    masks = global_magnitude_masks(model, ["0", "2"], 0.3)
    torch_prune.global_unstructured([(reference[0], "weight"), (reference[2], "weight")],
                                    pruning_method=torch_prune.L1Unstructured, amount=int(0.3 * 900))
    assert torch.equal(masks["0"], reference[0].weight_mask.bool())
    assert torch.equal(masks["2"], reference[2].weight_mask.bool())
    set_masks(model, masks)  # a second round prunes among the weights still there, as torch's does
    torch_prune.l1_unstructured(reference[0], "weight", amount=100)
    again = layer_magnitude_masks(model, {"0": 100})
    assert torch.equal(again["0"], reference[0].weight_mask.bool())
    assert (~again["0"]).sum() == int(0.3 * 900) - (~masks["2"]).sum() + 100


def test_masks_persist_through_fine_tuning_and_checkpoints():
    torch.manual_seed(0)
    model = apply_plan(randomize_batchnorm(small_cnn()), Plan(), X16)
    paths = ["0", "3", "6", "9"]
    masks = global_magnitude_masks(model, paths, 0.6)
    set_masks(model, masks)
    data = torch.utils.data.TensorDataset(torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,)))
    train(model, data, FEW, 2, seed=0)
    for path in paths:
        weight = model.get_submodule(path).weight
        assert torch.all(weight[~masks[path]] == 0) and torch.all(weight[masks[path]] != 0)
    plain = plain_state_dict(model)
    assert not any(key.endswith(("_orig", "_mask")) for key in plain)
    fresh = small_cnn()
    fresh.load_state_dict(plain)
    model.eval()
    assert torch.equal(fresh.eval()(X16[0]), model(X16[0]))


def test_a_layer_pruned_to_zero_entropy_collapses_and_the_compressed_model_equals_the_pruned_one():
    torch.manual_seed(0)
    base = randomize_batchnorm(small_cnn()).eval()
    with torch.no_grad():  # the third conv's weights all pruned: its BN outputs beta, on (> 0) or off (< 0)
        base[7].bias.copy_(torch.tensor([0.5, -0.5] * 8))
        base[7].running_mean.zero_()
    pruned = apply_plan(base, Plan(), X16)
    set_masks(pruned, {"6": torch.zeros_like(base[6].weight, dtype=torch.bool)})
    calibration = [(torch.randn(8, 3, 16, 16),) for _ in range(2)]
    choices = Egp().choose(pruned.eval(), StepInputs(X16, calibration, None, None), 1)
    collapsed = [choice for choice in choices if choice.decisions]
    assert [choice.target for choice in collapsed] == ["8:relu"]
    off, linearize = collapsed[0].decisions
    assert linearize.action == "linearize" and off.action in ("remove_channels", "zero_channels")
    assert off.params["channels"] == list(range(1, 16, 2))
    planned = apply_plan(pruned, Plan(collapsed[0].decisions), X16)
    result = compress(planned, X16)
    assert result.report.after.activations == result.report.before.activations - 1
    for batch, in calibration:
        with torch.no_grad():
            assert torch.allclose(result.module(batch), pruned(batch), rtol=1e-4, atol=1e-5)
    prune_choice = choices[-1]
    assert prune_choice.masks is not None and "6" not in prune_choice.masks or prune_choice.masks["6"].sum() == 0


@needs_data
@pytest.mark.parametrize("method", ["egp", "magnitude", "dsd2"])
def test_each_pruning_method_runs_the_loop_and_resumes(method, tmp_path):
    data = fashion_mnist_splits(16, validation=64, train_samples=96, test_samples=64)
    model = small_cnn()
    options = dict(method=method, data=data, train_config=FEW, max_drop=1.0, progress=False)
    whole = fxcompress.prune(model, X16, steps=2, **options)
    steps = whole.trajectory.steps
    rate = 0.2 if method == "dsd2" else 0.5
    assert [len(step["chosen"]) >= 1 for step in steps[1:]] == [True, True]
    assert steps[0]["sparsity"] < 0.01 and 0 < steps[1]["sparsity"] < steps[2]["sparsity"]
    assert steps[2]["sparsity"] <= 1 - (1 - rate) ** 2 + 0.01
    if method == "dsd2":
        assert whole.trajectory.training["distill"] == 0.8 and whole.trajectory.training["temperature"] == 10.0
    fxcompress.prune(model, X16, steps=1, out=tmp_path, **options)
    resumed = fxcompress.prune(model, X16, steps=2, out=tmp_path, resume=True, **options)
    assert [step["sparsity"] for step in resumed.trajectory.steps] == [step["sparsity"] for step in steps]
    assert [step["validation"] for step in resumed.trajectory.steps] == [step["validation"] for step in steps]
    final = resumed.model.eval()
    with torch.no_grad():
        assert torch.equal(final(X16[0]), whole.model.eval()(X16[0]))
    assert plan_of(final) == whole.plan


def test_distilling_methods_refuse_callables():
    with pytest.raises(OptionError, match="built-in trainer"):
        fxcompress.prune(small_cnn(), X16, method="dsd2", finetune=lambda model: None, evaluate=lambda model: 1.0)


def test_bad_pruning_options_are_refused():
    for options, message in (({"rate": 1.0}, "prune rate must be in"), ({"rate": 0}, "prune rate must be in"),
                             ({"pruning": "random"}, "DSD2 pruning must be one of")):
        with pytest.raises(OptionError, match=message):
            fxcompress.prune(small_cnn(), X16, method="dsd2", data=object(), method_options=options)
    assert math.isclose(Egp().rate, 0.5)


@needs_data
@pytest.mark.slow
def test_egp_prunes_mobilenet_v2_layer_by_layer():
    data = fashion_mnist_splits(32, validation=64, train_samples=96, test_samples=64)
    model = with_classes(torchvision_model("mobilenet_v2"), 10)
    result = fxcompress.prune(model, (torch.randn(1, 3, 32, 32),), method="egp", data=data, train_config=FEW,
                              steps=1, max_drop=1.0, progress=False)
    masks = [module.weight_mask for module in result.model.modules() if hasattr(module, "weight_mask")]
    assert len(masks) == 35  # the convs feeding the 35 ReLU6 (not the projections, not the head)
    pruned = sum((mask == 0).sum().item() for mask in masks)
    assert abs(pruned - 0.5 * sum(mask.numel() for mask in masks)) <= len(masks)  # amounts are floored per layer
    kept = [mask.float().mean().item() for mask in masks]
    assert min(kept) < 0.4 and max(kept) > 0.6  # split unevenly by entropy x magnitude
    assert 0 < result.trajectory.steps[1]["sparsity"] < 0.5


X784 = (torch.randn(1, 784, generator=torch.Generator().manual_seed(1)),)
LENET_LAYERS = ["0", "2", "4"]


def lenet_300_100(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def all_weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([effective_weight(model.get_submodule(path)).flatten() for path in LENET_LAYERS])


def vectors(samples: int, seed: int) -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(samples, 784, generator=generator),
                                          torch.randint(0, 10, (samples,), generator=generator))


@pytest.mark.parametrize("rounds", [1, 3])
def test_scope_all_prunes_every_layer_by_global_magnitude_the_output_layer_included(rounds):
    model = apply_plan(lenet_300_100(), Plan(), X784).eval()
    inputs = StepInputs(X784, [(torch.randn(32, 784),)], None, None)
    method = Magnitude(rate=0.2, scope="all", collapse=False)
    for _ in range(rounds):
        before = all_weights(model)
        alive = before != 0
        choices = method.choose(model, inputs, 1)
        assert [choice.decisions for choice in choices] == [()] and list(choices[0].masks) == LENET_LAYERS
        set_masks(model, choices[0].masks)
        # direct computation: of the weights still alive, the int(20 %) smallest magnitudes go
        expected = alive.clone()
        expected[alive.nonzero().flatten()[before.abs()[alive].argsort()[:int(0.2 * alive.sum())]]] = False
        after = all_weights(model)
        assert torch.equal(after != 0, expected)
        assert torch.equal(after[expected], before[expected])
    assert abs(expected.float().mean().item() - 0.8 ** rounds) < 1e-5
    feeding = Magnitude(rate=0.2, collapse=False).choose(model, inputs, 1)
    assert list(feeding[-1].masks) == ["0", "2"]  # the output layer feeds no activation


def test_rewind_sets_the_weights_back_under_masks_that_fine_tuning_keeps():
    model = lenet_300_100()
    initial = {key: value.clone() for key, value in model.state_dict().items()}
    train(model, vectors(64, 0), FEW, 1, seed=0)
    masks = global_magnitude_masks(model, LENET_LAYERS, 0.5)
    set_masks(model, masks)
    rewind(model, initial)
    for path in LENET_LAYERS:
        layer = model.get_submodule(path)
        assert torch.equal(effective_weight(layer), initial[f"{path}.weight"] * masks[path])
        assert torch.equal(layer.bias, initial[f"{path}.bias"]) and torch.equal(layer.weight_mask.bool(), masks[path])
    train(model, vectors(64, 1), FEW, 1, seed=1)
    for path in LENET_LAYERS:
        weight = effective_weight(model.get_submodule(path))
        assert torch.all(weight[~masks[path]] == 0)
        assert not torch.equal(weight[masks[path]], initial[f"{path}.weight"][masks[path]])


def test_the_loop_with_rewind_fine_tunes_each_step_from_the_initial_weights(tmp_path):
    model = lenet_300_100()
    initial = {key: value.clone() for key, value in model.state_dict().items()}
    data = Splits(vectors(128, 0), vectors(64, 1), vectors(64, 2), size=28)
    options = dict(method=Magnitude(rate=0.5, scope="all", collapse=False), data=data, rewind=True,
                   train_config=TrainConfig(max_batches=2, batch_size=16, lr=0.1, progress=False), dense_epochs=1,
                   max_drop=1.0, progress=False)
    fxcompress.prune(model, X784, steps=2, epochs_per_step=0, save_steps=True, out=tmp_path / "untrained",
                     **options)
    folder = RunFolder(tmp_path / "untrained")
    dense, steps = folder.step_model(0), [folder.step_model(step) for step in (1, 2)]
    assert not torch.equal(dense.get_submodule("0").weight, initial["0.weight"])  # the dense step trained
    # step 1's masks come from the trained dense weights' magnitudes, step 2's from the rewound weights'
    assert all(torch.equal(mask, masks_of(steps[0])[path])
               for path, mask in global_magnitude_masks(dense, LENET_LAYERS, 0.5).items())
    for planned in steps:
        for path, mask in masks_of(planned).items():
            layer = planned.get_submodule(path)
            assert torch.equal(effective_weight(layer), initial[f"{path}.weight"] * mask)
            assert torch.equal(layer.bias, initial[f"{path}.bias"])
    whole = fxcompress.prune(model, X784, steps=2, epochs_per_step=1, **options)
    fxcompress.prune(model, X784, steps=1, epochs_per_step=1, out=tmp_path / "run", **options)
    # resumed with another initialisation given: the run's own initial weights come from its checkpoint
    resumed = fxcompress.prune(lenet_300_100(seed=1), X784, steps=2, epochs_per_step=1, out=tmp_path / "run",
                               resume=True, **options)
    assert [step["validation"] for step in resumed.trajectory.steps] == \
        [step["validation"] for step in whole.trajectory.steps]
    with torch.no_grad():
        assert torch.equal(resumed.model.eval()(X784[0]), whole.model.eval()(X784[0]))
    assert all(torch.equal(value, initial[key]) for key, value in model.state_dict().items())
    assert whole.trajectory.steps[2]["sparsity"] == pytest.approx(0.75, abs=1e-5)


def test_rewind_needs_a_method_that_keeps_the_structure():
    for method, options, message in (("easier", {}, "rewind sets the weights back"),
                                     ("magnitude", {}, "collapse=False"),
                                     ("magnitude", {"method_options": {"collapse": False}, "anneal": 0.5},
                                      "rewind and anneal")):
        with pytest.raises(OptionError, match=message):
            fxcompress.prune(small_cnn(), X16, method=method, data=object(), rewind=True, **options)
    with pytest.raises(OptionError, match="scope 'all'"):
        Egp(scope="all")
    with pytest.raises(OptionError, match="scope must be one of feeding, all"):
        Magnitude(scope="every")
    with pytest.raises(OptionError, match="'collapse' must be a bool"):
        Magnitude(collapse="no")


@needs_data
def test_the_prune_command_rewinds_with_the_pruning_options(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).parent)
    code = cli_main(["prune", "loop_models:small_cnn", "--method", "magnitude", "--prune-scope", "all",
                     "--collapse", "false", "--rewind", "--size", "16", "--out", str(tmp_path / "run"), "--steps", "1",
                     "--max-drop", "1", "--train-samples", "32", "--validation-samples", "32", "--test-samples", "32",
                     "--batch-size", "16", "--max-batches", "1", "--lowering", "eager", "--quiet"])
    settings = RunFolder(tmp_path / "run").trajectory()["settings"]
    assert code == 0 and settings["rewind"] is True
    assert settings["method_options"] == {"rate": 0.5, "scope": "all", "collapse": False}
