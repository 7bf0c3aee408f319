"""How fast the compiler itself is: capture and the pass pipeline on torchvision ResNet-50 (1x3x224x224).

- capture: `fxcompress.capture.capture` (torch.export of a private copy).
- passes: `pipeline.compress_graph` on a fresh copy of the captured graph: every pass of every round, with
  the verification replays (the example and a random sample, before the passes and after each pass that
  changed the graph) and the snapshots for rollback.
- forward: one eager call of the captured graph, so that passes / forward says how many model runs the
  pipeline costs.
Medians over `--repeats` runs on this machine, in one process. Writes bench/results/compiler_speed.json
(`--output` to write elsewhere, e.g. to compare with another checkout of fxcompress run the same way).

    .venv/bin/python bench/compiler_speed.py
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torchvision

from fxcompress.capture import capture
from fxcompress.measure import machine
from fxcompress.pipeline import compress_graph

RESULTS = Path(__file__).parent / "results"


def median_s(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", type=Path, default=RESULTS / "compiler_speed.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    example = (torch.randn(1, 3, 224, 224),)
    with torch.no_grad():
        captured = capture(model, example)
        compress_graph(copy.deepcopy(captured), example)  # warm-up
        copies = [copy.deepcopy(captured) for _ in range(args.repeats)]
        results = {
            "capture_s": median_s(lambda: capture(model, example), args.repeats),
            "passes_s": median_s(lambda: compress_graph(copies.pop(), example), args.repeats),
            "forward_s": median_s(lambda: captured(*example), args.repeats),
        }
    results["passes_over_forward"] = results["passes_s"] / results["forward_s"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    report = {"model": "torchvision resnet50, random weights, 1x3x224x224, float32, CPU", "commit": commit,
              "repeats": args.repeats, "statistic": "median", "machine": machine(), **results}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
