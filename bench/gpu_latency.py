"""GPU latency on an NVIDIA machine: eager, Inductor, CUDA graphs (and TensorRT if importable), original
vs exact-compressed vs half-linearised, batch 1 and 32, CUDA-event medians. Budget: under 8 minutes.

    python bench/gpu_latency.py --out $OUT/gpu_latency.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import fxcompress
from fxcompress.measure import machine, measure_latency
from fxcompress.models import load_model


def cuda_graph(module, example):
    """Capture one forward in a CUDA graph; replays reuse the captured input buffer."""
    static = [t.clone() for t in example]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            module(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        output = module(*static)

    def replay(*inputs):
        for buffer, value in zip(static, inputs):
            buffer.copy_(value)
        graph.replay()
        return output
    return replay


def lowerings(module, example) -> dict:
    runners = {"eager": module, "cuda_graphs": cuda_graph(module, example),
               "inductor": torch.compile(module, options={"freezing": True})}
    try:
        import torch_tensorrt
    except ImportError:
        return runners
    runners["tensorrt"] = torch_tensorrt.compile(module, ir="dynamo", inputs=list(example))
    return runners


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="resnet18,resnet50,mobilenet_v2")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default="bench/results/gpu_latency.json")
    parser.add_argument("--budget-s", type=float, default=420)
    args = parser.parse_args()
    start, rows = time.time(), []
    for name in args.models.split(","):
        model = load_model(name)
        for batch in map(int, args.batches.split(",")):
            if time.time() - start > args.budget_s:
                break
            example = (torch.randn(batch, 3, 224, 224),)
            names = fxcompress.activation_names(model, example)
            half = fxcompress.Plan.linearize(names[len(names) // 2:])
            variants = {"original": model, "exact": fxcompress.compress(model, example).module,
                        "half_linearized": fxcompress.compress(model, example, plan=half).module}
            example = tuple(t.cuda() for t in example)
            per_lowering: dict[str, dict] = {}
            for variant, module in variants.items():
                with torch.no_grad():
                    for lowering, runner in lowerings(module.cuda().eval(), example).items():
                        per_lowering.setdefault(lowering, {})[variant] = runner
            for lowering, runners in per_lowering.items():
                timing = measure_latency(runners, example, warmup=10, repeats=args.repeats, device="cuda")
                rows.append({"model": name, "batch": batch, "lowering": lowering, **{
                    f"{variant}_ms": result["median_ms"] for variant, result in timing.items()},
                    **{f"{variant}_ratio": result["ratio"] for variant, result in timing.items()}})
                print(json.dumps(rows[-1]), flush=True)
            with open(args.out, "w") as handle:
                json.dump({"machine": machine(), "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
