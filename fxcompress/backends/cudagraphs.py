"""CUDA-graph lowering: the model's kernels recorded once into a CUDA graph and replayed, so that a call costs one
launch instead of one per op (at small batch a GPU is otherwise launch-bound, and depth is what it pays for).

Shapes are static: one graph is recorded per set of input shapes (and of the integer sizes dynamo passes with
dynamic shapes), on its first call with them. A call copies its inputs into the recorded buffers, replays the
graph and returns the recorded outputs, which the next call overwrites (as torch.compile's
mode="reduce-overhead" does): clone them to keep them.
"""
from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

from ..errors import OptionError

WARMUP = 3  # eager runs on a side stream before recording (cuDNN picks its algorithms, lazy state is made)


def require_cuda(example_inputs, lowering: str) -> None:
    tensors = [t for t in pytree.tree_leaves(tuple(example_inputs)) if isinstance(t, torch.Tensor)]
    if not tensors or any(t.device.type != "cuda" for t in tensors if t.dim()):
        devices = sorted({str(t.device) for t in tensors}) or ["none"]
        raise OptionError(f"the {lowering} lowering runs on a GPU: it needs CUDA inputs, got inputs on "
                          f"{', '.join(devices)}; use eager, inductor or onnxruntime on the CPU")


class _Recorded:
    """One recorded graph with its input and output buffers."""

    def __init__(self, model, inputs: tuple):
        self.inputs = tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in inputs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(WARMUP):
                model(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.outputs = model(*self.inputs)

    def __call__(self, inputs: tuple):
        for buffer, value in zip(self.inputs, inputs):
            if isinstance(buffer, torch.Tensor):
                buffer.copy_(value)
        self.graph.replay()
        return self.outputs


class CudaGraphRunner:
    """Runs `model` by replaying the CUDA graph recorded for the inputs' shapes."""

    def __init__(self, model):
        self.model = model
        self.recorded: dict[tuple, _Recorded] = {}

    @staticmethod
    def _key(inputs: tuple) -> tuple:
        return tuple((tuple(t.shape), t.dtype, t.device) if isinstance(t, torch.Tensor) else t for t in inputs)

    def __call__(self, *inputs):
        key = self._key(inputs)
        if key not in self.recorded:
            require_cuda(inputs, "cudagraphs")
            self.recorded[key] = _Recorded(self.model, inputs)
        return self.recorded[key](inputs)


def graph(gm, example_inputs):
    require_cuda(example_inputs, "cudagraphs")
    return CudaGraphRunner(gm)


def module(model, example_inputs):
    require_cuda(example_inputs, "cudagraphs")
    runner = CudaGraphRunner(model)
    runner(*example_inputs)
    return runner
