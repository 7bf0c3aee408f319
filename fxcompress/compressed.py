"""The module `compress` returns: an inference graph that behaves like any torch module.

torch.export's module refuses `.eval()` and `.train()`, and cannot be pickled (its input guard is wrapped in a
local function). `compressed_module` rebuilds the compressed graph as a `CompressedModule`, a GraphModule whose
weights and constants are parameters and buffers, so that `.eval()`, `.to(device)`, `.half()`, `copy.deepcopy`,
`state_dict()`, `torch.save`/`torch.load(..., weights_only=False)` and `torch.export.export` work; the export's
guard becomes an `InputGuard` that names the expected shape. `.train()` is refused: the graph was captured in
eval mode (BatchNorms folded, dropout gone), so training mode would change nothing; fine-tune the model with
`apply_plan` before compressing instead.
"""
from __future__ import annotations

import torch
from torch import fx

from .errors import OptionError
from .ops import conv_with_bias_map
from .token_merge import projected_keys, reduce_step

GUARD = "_guards_fn"  # the name torch.export gives its input guard module (`graph.is_guard` knows it)
GRAPH_FUNCTIONS = (conv_with_bias_map, reduce_step, projected_keys)  # the Python functions rewrites call


def _describe(shape) -> str:
    return "(" + ", ".join("N" if size is None else str(size) for size in shape) + ")"


class InputGuard(torch.nn.Module):
    """Checks the inputs' ranks and static sizes against those the graph was captured for (None: any size)."""

    def __init__(self, shapes: list[tuple | None]):
        super().__init__()
        self.shapes = shapes

    def forward(self, *inputs) -> None:
        for index, (shape, value) in enumerate(zip(self.shapes, inputs)):
            if shape is None or not isinstance(value, torch.Tensor):
                continue
            fits = value.dim() == len(shape) and all(size is None or size == actual
                                                     for size, actual in zip(shape, value.shape))
            if not fits:
                raise ValueError(f"this compressed module takes input {index} of shape {_describe(shape)} "
                                 f"(N: any size), got {tuple(value.shape)}; compress the model again for "
                                 "these shapes")


def _static_shape(node: fx.Node) -> tuple | None:
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return None
    return tuple(size if isinstance(size, int) else None for size in value.shape)


class Retracer(fx.Tracer):
    """Re-traces the code of a pickled compressed module (`torch.load`), keeping the functions that fxcompress's
    rewrites call as single calls, as they were in the graph."""

    def __init__(self):
        super().__init__(autowrap_functions=GRAPH_FUNCTIONS)


class CompressedModule(fx.GraphModule):
    """A compressed inference graph (module docstring)."""

    def train(self, mode: bool = True):
        if mode:
            raise OptionError("a compressed module is an inference graph (BatchNorms folded, dropout removed): "
                              "train mode would change nothing; fine-tune the planned model (fxcompress.apply_plan)"
                              " and compress it again")
        return super().train(False)

    def __reduce__(self):
        return _restore, super().__reduce__()


def _restore(rebuild, arguments) -> CompressedModule:
    gm = rebuild(*arguments)
    return CompressedModule(gm, gm.graph, class_name="CompressedModule")


def compressed_module(gm: fx.GraphModule) -> CompressedModule:
    """`gm` (a compressed graph) as a CompressedModule in eval mode, sharing its weights; torch.export's guard, if
    any, replaced by an InputGuard over the captured shapes of the inputs it checks."""
    guard = next((node for node in gm.graph.nodes if node.op == "call_module" and node.target == GUARD), None)
    if guard is not None:
        gm._modules[GUARD] = InputGuard([_static_shape(arg) if isinstance(arg, fx.Node) else None
                                         for arg in guard.args])
    gm.graph._tracer_cls = Retracer  # export's tracer cannot re-trace the pickled code
    module = CompressedModule(gm, gm.graph, class_name="CompressedModule")
    module.training = False
    for submodule in module.modules():
        submodule.training = False
    return module
