"""Lowerings: turn a model into what runs on a deployment backend. Optional dependencies (onnxruntime,
torch-tensorrt) are imported only when their lowering is asked for. A lowering runs where its example inputs
are: on the CPU, or on a GPU for CUDA tensors (cudagraphs and inductor-reduce-overhead need one).

Each lowering module has `module(model, example_inputs)` for a whole model (API, CLI, benchmarks);
those in GRAPH_LOWERINGS also have `graph(gm, example_inputs)` for the flat graph dynamo hands the
depthprune backend.
"""
from ..errors import valid_choice
from . import cudagraphs, eager, inductor, inductor_reduce_overhead, onnxruntime, tensorrt

LOWERINGS = {"eager": eager, "inductor": inductor, "onnxruntime": onnxruntime, "tensorrt": tensorrt,
             "cudagraphs": cudagraphs, "inductor-reduce-overhead": inductor_reduce_overhead}
GRAPH_LOWERINGS = ("eager", "inductor", "cudagraphs", "inductor-reduce-overhead")
GPU_LOWERINGS = ("cudagraphs", "inductor-reduce-overhead", "tensorrt")


def lower_graph(gm, example_inputs, lowering: str):
    valid_choice("lowering inside torch.compile", lowering, GRAPH_LOWERINGS)
    return LOWERINGS[lowering].graph(gm, example_inputs)


def lower_module(model, example_inputs, lowering: str, **options):
    valid_choice("lowering", lowering, LOWERINGS)
    return LOWERINGS[lowering].module(model, example_inputs, **options)
