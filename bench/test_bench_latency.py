"""pytest-benchmark suite: original vs exact-compressed vs half-linearised, eager CPU, batch 1.

    .venv/bin/python -m pytest bench/test_bench_latency.py --benchmark-json bench/results/pytest_benchmark.json

Compare rows within one run only (same machine, same load); bench/latency_table.py interleaves the
variants and is the source of the README table.
"""
import pytest
import torch

import fxcompress
from fxcompress.models import load_model

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


@pytest.mark.parametrize("kind", ["original", "exact", "half_linearized"])
@pytest.mark.parametrize("name", MODELS)
def test_latency(benchmark, name, kind):
    module, example = variant(name, kind)
    benchmark.group = name
    with torch.no_grad():
        benchmark.pedantic(module, args=example, rounds=10, warmup_rounds=2)
