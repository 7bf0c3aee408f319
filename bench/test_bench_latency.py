"""pytest-benchmark suite: original vs exact-compressed vs half-linearised, eager CPU, batch 1; and the speed
of the compiler itself (capture and passes on ResNet-50, as bench/compiler_speed.py measures it).

    .venv/bin/python -m pytest bench/test_bench_latency.py --benchmark-json bench/results/pytest_benchmark.json

Compare rows within one run only (same machine, same load); bench/latency_table.py interleaves the
variants and is the source of the README table.
"""
import copy

import pytest
import torch
import torchvision

import fxcompress
from fxcompress.capture import capture
from fxcompress.models import load_model
from fxcompress.pipeline import compress_graph

MODELS = ["resnet18", "pretrained_mobilenet_v2"]
_cache = {}


def variant(name: str, kind: str):
    if name not in _cache:
        model = load_model(name)
        example = (torch.randn(1, 3, 224, 224),)
        names = fxcompress.activation_names(model, example)
        half = fxcompress.Plan.linearize(names[len(names) // 2:])
        _cache[name] = {"original": model, "exact": fxcompress.compress(model, example).module,
                        "half_linearized": fxcompress.compress(model, example, plan=half).module}, example
    models, example = _cache[name]
    return models[kind], example


# The cost model's decision on real timings (moved from tests/test_cost.py: a shared CPU makes it flaky).
def test_measured_expand_project_pair_is_merged():
    chain = torch.nn.Sequential(torch.nn.Conv2d(64, 512, 1), torch.nn.Conv2d(512, 64, 1)).eval()
    result = fxcompress.compress(chain, (torch.randn(1, 64, 24, 24),), cost_model="latency")
    assert result.report.after.weight_layers == 1  # 1x1 64->64 instead of two 64x512 1x1s
    rewrite = result.report.rewrites[-1]
    assert rewrite.latency_after_ms < rewrite.latency_before_ms


@pytest.mark.parametrize("kind", ["original", "exact", "half_linearized"])
@pytest.mark.parametrize("name", MODELS)
def test_latency(benchmark, name, kind):
    module, example = variant(name, kind)
    benchmark.group = name
    with torch.no_grad():
        benchmark.pedantic(module, args=example, rounds=10, warmup_rounds=2)


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    example = (torch.randn(1, 3, 224, 224),)
    with torch.no_grad():
        return model, capture(model, example), example


@pytest.mark.parametrize("stage", ["capture", "passes"])
def test_compiler_speed(benchmark, resnet50, stage):
    model, captured, example = resnet50
    benchmark.group = "compiler resnet50"
    with torch.no_grad():
        if stage == "capture":
            benchmark.pedantic(capture, args=(model, example), rounds=5, warmup_rounds=1)
        else:
            benchmark.pedantic(compress_graph, setup=lambda: ((copy.deepcopy(captured), example), {}), rounds=5,
                               warmup_rounds=1)
