"""The depthprune backend follows the weights it baked: edits through `.data`, weights without a version
counter, the opt-in check by value, and a cache that holds one compiled graph per set of weights in use."""
import gc
import logging

import pytest
import torch
from torch import nn

from fxcompress.dynamo_backend import depthprune
from fxcompress.errors import OptionError
from helpers import randomize_batchnorm, relative_error

x = torch.randn(2, 3, 16, 16)


def conv_bn_relu() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())).eval()


class Recorder:
    """A torch.compile backend that runs depthprune and keeps the compiled objects it returns."""

    def __init__(self, **options):
        self.options, self.compiled = {"lowering": "eager", **options}, []

    def __call__(self, gm, example_inputs):
        self.compiled.append(depthprune(gm, example_inputs, self.options))
        return self.compiled[-1]

    @property
    def compilations(self) -> int:
        return sum(compiled.compilations for compiled in self.compiled)


def assign_data(model):
    model[0].weight.data = model[0].weight.data * 2


def assign_other_shape(model):
    model[0].weight.data = torch.randn(8, 3, 1, 1)
    model[0].padding = (0, 0)


def assign_buffer_data(model):
    model[1].running_var.data = model[1].running_var.data * 3


def vector_to_parameters(model):
    vector = torch.nn.utils.parameters_to_vector(model.parameters())
    torch.nn.utils.vector_to_parameters(vector * 1.5, model.parameters())


@pytest.mark.parametrize("edit", [assign_data, assign_other_shape, assign_buffer_data, vector_to_parameters])
def test_edits_through_data_that_change_the_storage_are_seen(edit):
    model = conv_bn_relu()
    compiled = torch.compile(model, backend="depthprune", options={"lowering": "eager"})
    with torch.no_grad():
        compiled(x)
        edit(model)
        assert relative_error(model(x), compiled(x)) <= 1e-5


def test_in_place_edit_through_data_is_seen_by_the_value_check():
    model = conv_bn_relu()
    recorder = Recorder(check_weights="value")
    compiled = torch.compile(model, backend=recorder)
    with torch.no_grad():
        compiled(x)
        compiled(x)
        assert recorder.compilations == 1
        model[0].weight.data.mul_(2)
        model[1].running_mean.data.add_(1)
        assert relative_error(model(x), compiled(x)) <= 1e-5
        assert recorder.compilations == 2


def test_weights_built_under_inference_mode_compile():
    with torch.inference_mode():
        model = conv_bn_relu()  # inference tensors have no version counter
    compiled = torch.compile(model, backend="depthprune", options={"lowering": "eager"})
    with torch.no_grad():
        assert relative_error(model(x), compiled(x)) <= 1e-5


def test_in_place_edit_of_inference_weights_is_seen_by_the_value_check():
    with torch.inference_mode():
        model = conv_bn_relu()
    compiled = torch.compile(model, backend="depthprune", options={"lowering": "eager", "check_weights": "value"})
    with torch.inference_mode():
        compiled(x)
        model[0].weight.mul_(2)
        assert relative_error(model(x), compiled(x)) <= 1e-5


def test_model_run_under_inference_mode_follows_edits():
    model = conv_bn_relu()
    compiled = torch.compile(model, backend="depthprune", options={"lowering": "eager"})
    with torch.inference_mode():
        compiled(x)
        model[0].weight.data = model[0].weight.data * 2
        assert relative_error(model(x), compiled(x)) <= 1e-5


def test_check_weights_option_is_validated():
    compiled = torch.compile(conv_bn_relu(), backend="depthprune", options={"check_weights": "hash"})
    with pytest.raises(Exception) as info:
        compiled(x)
    assert "unknown check_weights 'hash'; valid: identity, value" in str(info.value)
    with pytest.raises(OptionError):
        depthprune(torch.fx.symbolic_trace(conv_bn_relu()), [x], {"check_weights": "hash"})


class BrokenBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        torch._dynamo.graph_break()
        return x + 1


def broken_blocks(count: int) -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(nn.Sequential(*[BrokenBlock() for _ in range(count)])).eval()


def test_six_instances_sharing_one_graph_compile_once_each():
    model, inputs, reports = broken_blocks(6), torch.randn(1, 8, 8, 8), []
    recorder = Recorder(on_report=reports.append)
    compiled = torch.compile(model, backend=recorder)
    with torch.no_grad():
        compiled(inputs)
        after_first = len(reports)
        for _ in range(3):
            assert relative_error(model(inputs), compiled(inputs)) <= 1e-5
    assert len(reports) == after_first
    assert recorder.compilations == len(reports)
    assert max(len(c.cache) for c in recorder.compiled) == 6


def test_cache_entries_die_with_their_weights():
    recorder = Recorder()
    inputs = torch.randn(1, 8, 8, 8)
    first = BrokenBlock().eval()
    with torch.no_grad():
        torch.compile(first, backend=recorder)(inputs)
        second = BrokenBlock().eval()
        torch.compile(second, backend=recorder)(inputs)
    graph = recorder.compiled[0]
    assert len(graph.cache) == 2 and graph.compilations == 2
    del second
    gc.collect()
    assert len(graph.cache) == 1


def test_growing_cache_warns_once_per_doubling(monkeypatch):
    monkeypatch.setattr("fxcompress.dynamo_backend.CACHE_WARNING_SIZE", 2)
    recorder, inputs, blocks = Recorder(), torch.randn(1, 8, 8, 8), [BrokenBlock().eval() for _ in range(3)]
    with torch.no_grad(), pytest.warns(UserWarning, match="holds 2 compiled variants of one graph") as caught:
        for block in blocks:
            torch.compile(block, backend=recorder)(inputs)
    assert len([w for w in caught if "compiled variants" in str(w.message)]) == 1


def test_recompilation_is_logged_with_its_reason(caplog):
    model = conv_bn_relu()
    compiled = torch.compile(model, backend="depthprune", options={"lowering": "eager"})
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="fxcompress.dynamo_backend"):
        compiled(x)
        model[0].weight.data = model[0].weight.data * 2
        compiled(x)
    assert any("edited" in record.getMessage() and "data pointer" in record.getMessage()
               for record in caplog.records)
