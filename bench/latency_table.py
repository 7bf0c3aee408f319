"""CPU latency of original vs compressed torchvision models on eager, Inductor and ONNX Runtime.

For each model, batch size and lowering: the original, the exact-only compression, and a plan that
linearises the deepest half of the activations (cost model decides the merges; outputs change, so this
row is a latency study, not an accuracy claim). All three run interleaved in one measurement; ratios are
against the original on the same lowering. The FLOP floor is 2 x MACs / the measured peak of a large
matmul on this machine. Writes bench/results/latency.json (rewritten after every row) and latency.md.

    .venv/bin/python bench/latency_table.py [--models resnet18,...] [--batches 1,32] [--lowerings ...]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import fxcompress
from fxcompress.measure import machine
from fxcompress.models import load_model

RESULTS = Path(__file__).parent / "results"


def peak_matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times) / 1e9


def variants(model, example) -> dict:
    names = fxcompress.activation_names(model, example)
    half = fxcompress.Plan.linearize(names[len(names) // 2:], model="deepest half")
    exact = fxcompress.compress(model, example)
    planned = fxcompress.compress(model, example, plan=half)
    return {"original": (model, None), "exact": (exact.module, exact.report),
            "half_linearized": (planned.module, planned.report)}


def to_markdown(rows: list[dict]) -> str:
    lines = ["| model | batch | lowering | original ms | exact ms (ratio) | half-linearised ms (ratio) | "
             "MACs ratio (half) | FLOP floor ms |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['lowering']} | {r['original_ms']:.2f} | "
                     f"{r['exact_ms']:.2f} ({r['exact_ratio']:.3f}) | {r['half_ms']:.2f} ({r['half_ratio']:.3f}) | "
                     f"{r['half_macs_ratio']:.3f} | {r['floor_ms']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,resnet50,pretrained_mobilenet_v2")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--lowerings", default="eager,onnxruntime,inductor")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=str(RESULTS / "latency"))
    args = parser.parse_args()
    peak = peak_matmul_gflops()
    rows, info = [], {"machine": machine(), "peak_matmul_gflops": round(peak, 1), "size": args.size}
    for name in args.models.split(","):
        model = load_model(name)
        for batch in map(int, args.batches.split(",")):
            example = (torch.randn(batch, 3, args.size, args.size),)
            models = variants(model, example)
            macs = {key: report.after.macs if report else models["exact"][1].before.macs
                    for key, (_, report) in models.items()}
            for lowering in args.lowerings.split(","):
                repeats = args.repeats if batch == 1 else max(3, args.repeats // 3)
                timing = fxcompress.measure({k: m for k, (m, _) in models.items()}, example, lowering=lowering,
                                            repeats=repeats)["results"]
                rows.append({"model": name, "batch": batch, "lowering": lowering, "repeats": repeats,
                             "original_ms": timing["original"]["median_ms"],
                             "exact_ms": timing["exact"]["median_ms"], "exact_ratio": timing["exact"]["ratio"],
                             "half_ms": timing["half_linearized"]["median_ms"],
                             "half_ratio": timing["half_linearized"]["ratio"],
                             "half_macs_ratio": macs["half_linearized"] / macs["original"],
                             "floor_ms": 2 * macs["original"] / peak / 1e6, "quartiles": timing})
                print(to_markdown(rows[-1:]).splitlines()[-1], flush=True)
                Path(args.out + ".json").write_text(json.dumps({**info, "rows": rows}, indent=1))
    Path(args.out + ".md").write_text(to_markdown(rows) + "\n")


if __name__ == "__main__":
    main()
