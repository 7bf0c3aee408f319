"""Precision of a deployment artifact: a copy of the model and its example inputs cast to fp16 or bf16
(integer inputs keep their dtype). The caller's model is not touched."""
from __future__ import annotations

import torch

from ..capture import private_copy
from ..errors import valid_choice

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cast(model, example_inputs, precision: str, device: str | None = None) -> tuple:
    """(model copy, inputs) in `precision`, on `device` if given."""
    valid_choice("precision", precision, PRECISIONS)
    dtype = PRECISIONS[precision]
    model = private_copy(model).to(device=device, dtype=dtype)
    inputs = tuple(t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
                   for t in example_inputs)
    return model, inputs
