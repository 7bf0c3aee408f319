"""`measure`: inputs normalised like `compress`, the caller's model never written, bad arguments named."""
import pytest
import torch
from torch import nn

import fxcompress
from helpers import assert_state_unchanged, randomize_batchnorm, state_of

x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
FAST = {"warmup": 1, "repeats": 2}


class ShapeLog(nn.Module):
    """A conv that logs the shape of every input it is called with."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.seen = []

    def forward(self, inputs):
        self.seen.append(tuple(inputs.shape))
        return self.conv(inputs)


def bn_net():
    torch.manual_seed(0)
    return randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()))


def test_a_bare_tensor_is_one_batched_input():
    # Regression: a bare tensor was iterated over its batch dimension: the model ran on x[0] (3, 8, 8),
    # unbatched, and the reported batch was 3.
    bare, wrapped = ShapeLog().eval(), ShapeLog().eval()
    result = fxcompress.measure({"model": bare}, x, **FAST)
    reference = fxcompress.measure({"model": wrapped}, (x,), **FAST)
    assert result["batch"] == reference["batch"] == 1
    assert set(bare.seen) == set(wrapped.seen) == {(1, 3, 8, 8)}
    assert len(bare.seen) == len(wrapped.seen) == 3


def test_a_model_in_training_mode_is_refused_and_left_untouched():
    # Regression: measuring a model in training mode updated its BatchNorm running statistics.
    model = bn_net().train()
    before = state_of(model)
    with pytest.raises(fxcompress.OptionError, match=r"model 'original' \(Sequential\) is in training mode.*"
                                                     r"model.eval\(\)"):
        fxcompress.measure({"original": model}, (x,), **FAST)
    assert_state_unchanged(before, model)
    assert model.training


def test_a_batch_norm_left_in_training_mode_is_refused():
    model = bn_net().eval()
    model[1].train()
    before = state_of(model)
    with pytest.raises(fxcompress.OptionError, match=r"submodule '1' \(BatchNorm2d\) of model 'm' is in training"):
        fxcompress.measure({"m": model}, (x,), **FAST)
    assert_state_unchanged(before, model)


def test_an_eval_model_and_its_compressed_graph_are_measured_without_writes():
    model = bn_net().eval()
    compressed = fxcompress.compress(model, x).module  # an exported graph: its mode is fixed at capture
    before = state_of(model)
    result = fxcompress.measure({"original": model, "compressed": compressed}, (x,), **FAST)
    assert_state_unchanged(before, model)
    assert set(result["results"]) == {"original", "compressed"} and result["batch"] == 1


def test_an_exported_program_is_measured_through_its_module():
    # Regression: `fxcompress demo saved.pt2` crashed: "Unable to call ExportedProgram directly".
    model = bn_net().eval()
    program = torch.export.export(model, (x,))
    result = fxcompress.measure({"original": model, "saved": program}, (x,), **FAST)
    assert result["results"]["saved"]["median_ms"] > 0


@pytest.mark.parametrize("models, inputs, options, message", [
    ({}, x, {}, r"models must be a non-empty dict of name -> torch.nn.Module"),
    ({"a": "resnet18"}, x, {}, r"model 'a' is a str, not a torch.nn.Module or ExportedProgram"),
    ({"a": nn.Identity().eval()}, {"x": x}, {}, r"example_inputs must be a tensor or a non-empty tuple of "
                                                r"tensors, got dict"),
    ({"a": nn.Identity().eval()}, (), {}, r"example_inputs must be a tensor or a non-empty tuple of tensors"),
    ({"a": nn.Identity().eval()}, x, {"device": "foo"}, r"unknown device 'foo'; valid: cpu, cuda"),
    ({"a": nn.Identity().eval()}, x, {"repeats": 0}, r"option 'repeats' must be an int >= 1, got 0"),
    ({"a": nn.Identity().eval()}, x, {"warmup": -1}, r"option 'warmup' must be an int >= 0, got -1"),
    ({"a": nn.Identity().eval()}, x, {"repeats": 2.5}, r"option 'repeats' must be an int >= 1, got 2.5"),
    ({"a": nn.Identity().eval()}, x, {"lowering": "tvm"}, r"unknown lowering 'tvm'; valid: cudagraphs, eager"),
])
def test_bad_arguments_are_named(models, inputs, options, message):
    with pytest.raises(fxcompress.OptionError, match=message):
        fxcompress.measure(models, inputs, **options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_that_is_not_there_is_named():
    with pytest.raises(fxcompress.OptionError, match=r"device 'cuda' is not available here \(CUDA is not"):
        fxcompress.measure({"a": nn.Identity().eval()}, x, device="cuda")
