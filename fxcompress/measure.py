"""Latency measurement: warm-up, repetitions, medians and spread. Candidates are lowered the same way and
run in turn within every repetition, so machine noise hits all of them alike; ratios are against the
first candidate. CUDA events time GPU work."""
from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from typing import Callable

import torch

from .backends import lower_module


def _timer(device: str) -> Callable[[Callable], float]:
    if device == "cuda":
        def cuda_time(run):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            stop.record()
            torch.cuda.synchronize()
            return start.elapsed_time(stop)
        return cuda_time

    def cpu_time(run):
        start = time.perf_counter()
        run()
        return (time.perf_counter() - start) * 1e3
    return cpu_time


def machine() -> dict:
    info = {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


@torch.no_grad()
def measure_latency(runners: dict[str, Callable], inputs: tuple, *, warmup: int = 3, repeats: int = 20,
                    device: str = "cpu") -> dict:
    """Time already-lowered callables on `inputs`: median, quartiles and ratio to the first, in ms."""
    timer = _timer(device)
    for _ in range(warmup):
        for run in runners.values():
            run(*inputs)
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            samples[name].append(timer(lambda: run(*inputs)))
    baseline = statistics.median(next(iter(samples.values())))
    results = {}
    for name, values in samples.items():
        q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
        median = statistics.median(values)
        results[name] = {"median_ms": median, "q1_ms": q1, "q3_ms": q3, "ratio": median / baseline}
    return results


def measure(models: dict[str, torch.nn.Module], example_inputs: tuple, *, lowering: str = "eager",
            warmup: int = 3, repeats: int = 20, device: str = "cpu") -> dict:
    """Lower every model with `lowering` and time them interleaved; the first is the baseline.

    Returns {"results": {name: {median_ms, q1_ms, q3_ms, ratio}}, "lowering", "batch", "device", "machine"}.
    """
    inputs = tuple(t.to(device) for t in example_inputs)
    runners = {name: lower_module(model if device == "cpu" else copy.deepcopy(model).to(device), inputs, lowering)
               for name, model in models.items()}
    return {"results": measure_latency(runners, inputs, warmup=warmup, repeats=repeats, device=device),
            "lowering": lowering, "batch": int(inputs[0].shape[0]), "device": device, "machine": machine()}
