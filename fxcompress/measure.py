"""Latency: warm-up, repetitions, medians; candidates interleaved so that machine noise hits all alike."""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import torch


@torch.no_grad()
def measure_latency(candidates: dict[str, Callable], inputs: tuple, *, warmup: int = 3,
                    repeats: int = 20) -> dict:
    """Median and spread (ms) per candidate, each run in turn within every repetition."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn(*inputs)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn(*inputs)
            samples[name].append((time.perf_counter() - start) * 1e3)
    results = {}
    for name, values in samples.items():
        quartiles = statistics.quantiles(values, n=4)
        results[name] = {"median_ms": statistics.median(values), "q1_ms": quartiles[0], "q3_ms": quartiles[2],
                         "repeats": repeats}
    return {"results": results, "threads": torch.get_num_threads(), "machine": platform.processor() or
            platform.machine(), "torch": torch.__version__}
