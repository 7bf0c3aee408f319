"""TorchInductor with CUDA graphs (torch.compile's mode="reduce-overhead") and freezing: Inductor's fused kernels,
replayed as one CUDA graph per input shape. GPU only; its outputs are overwritten by the next call."""
from . import inductor
from .cudagraphs import require_cuda

CUDA_GRAPHS = {"triton.cudagraphs": True}


def graph(gm, example_inputs):
    require_cuda(example_inputs, "inductor-reduce-overhead")
    return inductor.graph(gm, example_inputs, CUDA_GRAPHS)


def module(model, example_inputs):
    require_cuda(example_inputs, "inductor-reduce-overhead")
    return inductor.module(model, example_inputs, CUDA_GRAPHS)
