"""TensorRT through torch-tensorrt's ahead-of-time path (`ir="dynamo"`), an optional extra.

torch-tensorrt 2.N pairs with torch 2.N exactly, needs an NVIDIA GPU with CUDA, and since 2.13 ignores
`enabled_precisions` on the dynamo path: precision follows the model's dtype, so fp16/bf16 engines are
built by casting the model and inputs first.
"""
from __future__ import annotations

import torch

from ..capture import mark_inference
from ..errors import MissingDependencyError, valid_choice
from .precision import PRECISIONS, cast


def _require():
    try:
        import torch_tensorrt
    except ImportError as error:
        raise MissingDependencyError(
            "the tensorrt lowering needs torch-tensorrt (the release matching torch "
            f"{torch.__version__.split('+')[0]}) and an NVIDIA GPU: pip install 'fxcompress[tensorrt]'") from error
    return torch_tensorrt


def compile_arguments(model, example_inputs, precision: str, device: str) -> tuple:
    """(model copy, kwargs) for `torch_tensorrt.compile`: cast to the precision, moved to the device."""
    valid_choice("TensorRT precision", precision, PRECISIONS)
    model, inputs = cast(model, example_inputs, precision, device)
    return mark_inference(model), {"ir": "dynamo", "inputs": list(inputs)}


def module(model, example_inputs, precision: str = "fp32", device: str = "cuda"):
    torch_tensorrt = _require()
    if device == "cuda" and not torch.cuda.is_available():
        raise MissingDependencyError("the tensorrt lowering needs an NVIDIA GPU with CUDA; none is available")
    model, kwargs = compile_arguments(model, example_inputs, precision, device)
    return torch_tensorrt.compile(model, **kwargs)


def save_engine(compiled, example_inputs, path) -> None:
    _require().save(compiled, str(path), inputs=list(example_inputs))
