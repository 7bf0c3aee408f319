"""Latency measurement: warm-up, repetitions, medians and spread. Candidates are lowered the same way and
run in turn within every repetition, so machine noise hits all of them alike; ratios are against the
first candidate. CUDA events time GPU work."""
from __future__ import annotations

import importlib.metadata
import itertools
import os
import platform
import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import fx
from torch.nn.modules.batchnorm import _NormBase

from .backends import GPU_LOWERINGS, LOWERINGS, lower_module
from .backends.precision import PRECISIONS
from .capture import mark_inference, private_copy
from .errors import OptionError, valid_choice


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


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch (and the ONNX Runtime sessions made meanwhile) on `count` threads while open; None leaves them."""
    if count is None:
        yield
        return
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise OptionError(f"option 'threads' must be an integer >= 1, got {count!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def speedup(ratio: float) -> str:
    """A latency ratio (compressed / original) in words, the one wording every report uses: "1.52× faster",
    "1.03× slower", "as fast (1.00×)"."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < float("inf"):
        raise OptionError(f"a latency ratio must be a positive finite number, got {ratio!r}")
    if f"{ratio:.2f}" == "1.00" and f"{1 / ratio:.2f}" == "1.00":
        return "as fast (1.00×)"
    return f"{1 / ratio:.2f}× faster" if ratio < 1 else f"{ratio:.2f}× slower"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> dict:
    """Where a measurement ran: CPU model and count, torch threads, versions, the GPU if any."""
    info = {"processor": _cpu_model(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__}
    for package in ("torchvision", "onnxruntime"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
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


def _check_device(device: str) -> str:
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as error:
        raise OptionError(f"unknown device {device!r}; valid: cpu, cuda, cuda:N") from error
    valid_choice("device", kind, ("cpu", "cuda"))
    if kind == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"device {device!r} is not available here (CUDA is not); valid: cpu")
    return kind


def _check_inputs(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs or \
            not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise OptionError("example_inputs must be a tensor or a non-empty tuple of tensors, "
                          f"got {type(example_inputs).__name__}")
    return tuple(example_inputs)


def _check_model(name: str, model) -> torch.nn.Module:
    """The module to run; refused where running it would write to it (a BatchNorm in training mode)."""
    if isinstance(model, torch.export.ExportedProgram):
        return mark_inference(model.module())  # a graph whose mode was fixed when it was captured
    if not isinstance(model, torch.nn.Module):
        raise OptionError(f"model {name!r} is a {type(model).__name__}, not a torch.nn.Module or ExportedProgram")
    live = [(path, module) for path, module in model.named_modules()
            if module.training and (path == "" and not isinstance(module, fx.GraphModule) or
                                    isinstance(module, _NormBase) and module.track_running_stats)]
    if live:
        path, module = live[0]
        where = f"submodule {path!r} ({type(module).__name__}) of model {name!r}" if path else \
            f"model {name!r} ({type(model).__name__})"
        raise OptionError(f"{where} is in training mode (BatchNorm statistics and dropout are live); "
                          "call model.eval() before measuring it")
    return model


def _check_counts(warmup: int, repeats: int) -> None:
    for option, value, least in (("warmup", warmup, 0), ("repeats", repeats, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise OptionError(f"option {option!r} must be an int >= {least}, got {value!r}")


def _placed(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """`model` itself where its floating-point tensors already have `device` and `dtype`, else a copy moved and
    cast (the caller's model is never moved)."""
    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    if all(t.device == device and (t.dtype == dtype or not t.is_floating_point()) for t in tensors):
        return model
    return private_copy(model).to(device=device, dtype=dtype)


def op_timer(lowering: str, device: str = "cpu", repeats: int = 15) -> Callable[[torch.nn.Module, tuple], float]:
    """The median ms of one small module on `lowering` and `device` (the latency cost model's measurement)."""
    def time_op(module: torch.nn.Module, inputs: tuple) -> float:
        timing = measure({"op": module}, inputs, lowering=lowering, device=device, warmup=3, repeats=repeats)
        return timing["results"]["op"]["median_ms"]
    return time_op


def measure(models: dict[str, torch.nn.Module], example_inputs, *, lowering: str = "eager",
            warmup: int = 3, repeats: int = 20, device: str = "cpu", threads: int | None = None,
            precision: str = "fp32") -> dict:
    """Lower every model with `lowering` and time them interleaved; the first is the baseline.

    `example_inputs` is a tensor or a tuple of tensors, as for `compress`. Models are nn.Modules in eval mode
    (a BatchNorm in training mode is refused: measuring never writes to a model) or ExportedPrograms. Every model
    and the inputs run on `device` ("cpu", "cuda", "cuda:N") in `precision` ("fp32", "fp16", "bf16": floating-point
    weights and inputs cast); models elsewhere or in another precision are measured as copies. `threads` runs the
    lowering and the timing on that many CPU threads (default: torch's current number). GPU work is timed with
    CUDA events. Returns {"results": {name: {median_ms, q1_ms, q3_ms, ratio}}, "lowering", "batch", "device",
    "precision", "machine"}.
    """
    if not isinstance(models, dict) or not models:
        raise OptionError("models must be a non-empty dict of name -> torch.nn.Module")
    valid_choice("lowering", lowering, LOWERINGS)
    valid_choice("precision", precision, PRECISIONS)
    _check_counts(warmup, repeats)
    kind = _check_device(device)
    if kind == "cpu" and lowering in GPU_LOWERINGS:
        raise OptionError(f"lowering {lowering!r} runs on a GPU; measure it with device='cuda'")
    modules = {name: _check_model(name, model) for name, model in models.items()}
    dtype = PRECISIONS[precision]
    inputs = tuple(t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
                   for t in _check_inputs(example_inputs))
    target = inputs[0].device
    with torch_threads(threads):
        runners = {name: lower_module(_placed(model, target, dtype), inputs, lowering)
                   for name, model in modules.items()}
        return {"results": measure_latency(runners, inputs, warmup=warmup, repeats=repeats, device=kind),
                "lowering": lowering, "batch": int(inputs[0].shape[0]), "device": device, "precision": precision,
                "machine": machine()}
