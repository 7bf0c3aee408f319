"""What the second correctness round costs: the backend's value check of weights, the dynamic batch of
capture, and a graph shared by several instances. Medians of wall-clock times on this machine.

- check_weights: per-call time of torchvision ResNet-18 (1x3x32x32) under torch.compile(backend="depthprune",
  lowering eager) with check_weights "identity" (the default) and "value", next to eager.
- capture: `fxcompress.capture` of ResNet-18 and MobileNetV2 at 1x3x224x224, static and dynamic batch.
- shared graph: six instances of one block class with a graph break (one dynamo graph for all of them):
  per-call time compiled and eager, and the backend's compilations after the first call and after more.

Writes bench/results/backend_overheads.json.

    .venv/bin/python bench/backend_overheads.py
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from fxcompress.dynamo_backend import DepthPruneCompiled
from fxcompress.capture import capture
from fxcompress.measure import machine

RESULTS = Path(__file__).parent / "results"


def median_ms(run, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def check_weights_cost(repeats: int = 30) -> dict:
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 32, 32)
    rows = {"eager_ms": median_ms(lambda: model(x), repeats)}
    for mode in ("identity", "value"):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="depthprune", options={"lowering": "eager", "check_weights": mode})
        rows[f"{mode}_ms"] = median_ms(lambda: compiled(x), repeats)
    torch._dynamo.reset()
    return rows


def capture_cost(repeats: int = 3) -> dict:
    rows = {}
    x = torch.randn(1, 3, 224, 224)
    for name in ("resnet18", "mobilenet_v2"):
        model = getattr(torchvision.models, name)().eval()
        static = median_ms(lambda: capture(model, (x,)), repeats, warmup=1) / 1e3
        dynamic = median_ms(lambda: capture(model, (x,), dynamic_batch=True), repeats, warmup=1) / 1e3
        rows[name] = {"static_s": static, "dynamic_s": dynamic, "ratio": dynamic / static}
    return rows


class BrokenBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        torch._dynamo.graph_break()
        return x


@torch.no_grad()
def shared_graph_cost(instances: int = 6, repeats: int = 30) -> dict:
    model, x = nn.Sequential(*[BrokenBlock() for _ in range(instances)]).eval(), torch.randn(1, 8, 8, 8)
    compiled_objects = []

    def backend(gm, example_inputs):
        compiled_objects.append(DepthPruneCompiled(gm, list(example_inputs), {"lowering": "eager"}))
        return compiled_objects[-1]

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    compiled(x)
    after_first = sum(c.compilations for c in compiled_objects)
    rows = {"instances": instances, "compiled_ms": median_ms(lambda: compiled(x), repeats),
            "eager_ms": median_ms(lambda: model(x), repeats)}
    rows.update(compilations_after_first_call=after_first,
                compilations_after_all_calls=sum(c.compilations for c in compiled_objects))
    torch._dynamo.reset()
    return rows


def main() -> None:
    result = {"check_weights": check_weights_cost(), "capture": capture_cost(), "shared_graph": shared_graph_cost(),
              "machine": machine()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "backend_overheads.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
