"""capture: an nn.Module and example inputs become an FX GraphModule through torch.export.

The result is a private copy: passes may edit it and its weights in place without touching the caller's
model. Graphs that dynamo hands a backend come in through `backend.py` instead and meet the same passes.
"""
from __future__ import annotations

import copy

import torch
from torch import fx

from .errors import CaptureError


def check_inputs(model, example_inputs) -> tuple:
    if not isinstance(model, (torch.nn.Module, torch.export.ExportedProgram)):
        raise CaptureError(f"expected a torch.nn.Module or ExportedProgram, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise CaptureError("example_inputs must be a tensor or a non-empty tuple of inputs")
    if isinstance(model, torch.nn.Module) and model.training:
        raise CaptureError(f"{type(model).__name__} is in training mode (BatchNorm statistics and dropout are "
                           "live); call model.eval() before compressing it")
    if isinstance(model, torch.export.ExportedProgram):
        check_program_inputs(model, example_inputs)
    return tuple(example_inputs)


def _describe(value) -> str:
    if not isinstance(value, torch.Tensor):
        return type(value).__name__
    return f"({', '.join(map(str, value.shape))}) {str(value.dtype).removeprefix('torch.')}"


def check_program_inputs(program: torch.export.ExportedProgram, example_inputs) -> None:
    """Refuse example inputs whose number, shapes (symbolic dimensions aside) or dtypes differ from those
    a saved ExportedProgram was exported with: its guards would fail deep inside the passes."""
    names = set(program.graph_signature.user_inputs)
    expected = [node.meta.get("val") for node in program.graph.nodes if node.op == "placeholder" and node.name in names]
    if len(expected) != len(example_inputs):
        raise CaptureError(f"the ExportedProgram takes {len(expected)} input(s), got {len(example_inputs)}")
    for index, (spec, value) in enumerate(zip(expected, example_inputs)):
        if not isinstance(spec, torch.Tensor):
            continue
        fits = isinstance(value, torch.Tensor) and value.dtype == spec.dtype and value.dim() == spec.dim() and \
            all(not isinstance(size, int) or size == actual for size, actual in zip(spec.shape, value.shape))
        if not fits:
            raise CaptureError(f"the ExportedProgram takes input {index} of shape {_describe(spec)}, got "
                               f"{_describe(value)}; pass inputs of the shapes it was exported with")


def capture(model: torch.nn.Module, example_inputs) -> fx.GraphModule:
    """Export `model` on `example_inputs` (or take a saved ExportedProgram as it is) and return a private,
    editable copy of its graph."""
    example_inputs = check_inputs(model, example_inputs)
    if isinstance(model, torch.export.ExportedProgram):
        return copy.deepcopy(model.module())
    try:
        exported = torch.export.export(model, example_inputs)
    except Exception as error:  # torch.export raises many unrelated types; all mean "not capturable"
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CaptureError(f"torch.export could not capture {type(model).__name__}: {first_line}") from error
    return copy.deepcopy(exported.module())
