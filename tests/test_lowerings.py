"""Lowerings: ONNX export + ONNX Runtime, Inductor with freezing, TensorRT plumbing; measure()."""
import importlib
import sys
import types

import onnx
import pytest
import torch

import fxcompress
from fxcompress.backends import lower_module, tensorrt
from fxcompress.backends.onnxruntime import export_onnx
from helpers import all_activations, relative_error, torchvision_model


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("planned", [False, True])
def test_onnx_export_of_compressed_models_matches_torch(tmp_path, name, planned):
    model = torchvision_model(name)
    example = (torch.randn(2, 3, 32, 32),)
    plan = all_activations(model, example) if planned else None
    result = fxcompress.compress(model, example, plan=plan, force=planned)
    path = export_onnx(result.module, example, tmp_path / "m.onnx")
    onnx.checker.check_model(str(path))
    runner = lower_module(result.module, example, "onnxruntime")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(result.module(x), runner(x)) <= 1e-4


def test_inductor_lowering_of_compressed_model_matches():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU()).eval()
    example = (torch.randn(1, 3, 12, 12),)
    result = fxcompress.compress(model, example)
    with torch.no_grad():
        assert relative_error(model(*example), lower_module(result.module, example, "inductor")(*example)) <= 1e-5


def test_tensorrt_missing_package_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)
    with pytest.raises(fxcompress.MissingDependencyError, match="torch-tensorrt .* NVIDIA GPU"):
        lower_module(torch.nn.Linear(2, 2), (torch.randn(1, 2),), "tensorrt")


def test_tensorrt_argument_plumbing_with_a_stand_in_torch_tensorrt(monkeypatch):
    calls = {}

    def compile(model, **kwargs):
        calls["model"], calls["kwargs"] = model, kwargs
        return model

    monkeypatch.setitem(sys.modules, "torch_tensorrt", types.SimpleNamespace(compile=compile))
    model = torch.nn.Linear(4, 2).eval()
    lower_module(model, (torch.randn(3, 4),), "tensorrt", precision="fp16", device="cpu")
    kwargs = calls["kwargs"]
    assert kwargs["ir"] == "dynamo" and "enabled_precisions" not in kwargs  # precision follows dtype
    assert kwargs["inputs"][0].dtype == torch.float16 and calls["model"].weight.dtype == torch.float16
    assert model.weight.dtype == torch.float32  # the caller's model is not cast
    with pytest.raises(fxcompress.OptionError, match="unknown TensorRT precision 'int4'"):
        tensorrt.compile_arguments(model, (torch.randn(3, 4),), "int4", "cpu")


def test_tensorrt_takes_a_compressed_graph(monkeypatch):
    # Regression: compile_arguments called .eval() on its copy, which an exported graph refuses
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    compressed = fxcompress.compress(model, (torch.randn(3, 4),)).module
    copy, kwargs = tensorrt.compile_arguments(compressed, (torch.randn(3, 4),), "fp16", "cpu")
    assert not copy.training and kwargs["inputs"][0].dtype == torch.float16


def test_tensorrt_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_tensorrt", types.SimpleNamespace(compile=None))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(fxcompress.MissingDependencyError, match="needs an NVIDIA GPU with CUDA"):
        lower_module(torch.nn.Linear(2, 2), (torch.randn(1, 2),), "tensorrt")


def test_missing_onnxruntime_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(fxcompress.MissingDependencyError, match="needs onnxruntime: pip install 'fxcompress\\[onnx\\]'"):
        lower_module(torch.nn.Linear(2, 2), (torch.randn(1, 2),), "onnxruntime")


class Scripted(torch.nn.Module):
    """Identity that advances a fake clock by its next scripted duration (ms) on every call."""

    def __init__(self, clock, durations_ms):
        super().__init__()
        self.clock, self.durations_ms = clock, list(durations_ms)

    def forward(self, x):
        self.clock.now += self.durations_ms.pop(0) / 1e3
        return x


def test_measure_reports_medians_quartiles_and_ratios_of_scripted_runs(monkeypatch):
    # Real timings on a shared CPU prove nothing: the clock is scripted, the statistics computed by hand.
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(importlib.import_module("fxcompress.measure"), "time",
                        types.SimpleNamespace(perf_counter=lambda: clock.now))
    original = Scripted(clock, [7.0, 4.0, 6.0, 5.0, 9.0, 5.0]).eval()  # one warm-up, then five timed runs
    compressed = Scripted(clock, [7.0, 2.0, 1.0, 3.0, 2.0, 1.0]).eval()
    timing = fxcompress.measure({"original": original, "compressed": compressed}, (torch.randn(64, 8),),
                                warmup=1, repeats=5)
    results = timing["results"]
    assert not original.durations_ms and not compressed.durations_ms
    # sorted 4 5 5 6 9: median 5, quartiles 4.5 and 7.5; sorted 1 1 2 2 3: median 2, quartiles 1 and 2.5
    assert results["original"] == pytest.approx({"median_ms": 5.0, "q1_ms": 4.5, "q3_ms": 7.5, "ratio": 1.0})
    assert results["compressed"] == pytest.approx({"median_ms": 2.0, "q1_ms": 1.0, "q3_ms": 2.5, "ratio": 0.4})
    assert timing["machine"]["threads"] == torch.get_num_threads() and timing["batch"] == 64
