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
    return tuple(example_inputs)


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
