"""capture: an nn.Module and example inputs become an FX GraphModule through torch.export.

The result is a private copy: export runs on a deep copy of the caller's model, so passes may edit the graph
and its weights in place, and an export that fails half-way cannot leave the caller's parameters swapped for
the fake tensors it traces with. torch.export is not thread-safe and shares tracing state with dynamo: every
export holds dynamo's compile lock, so exports run one at a time and never beside a torch.compile
compilation in another thread.

With `dynamic_batch`, dim 0 of every tensor input whose leading size is the batch's becomes one symbolic
size, so the graph runs on any batch size (export specialises sizes 0 and 1, so a batch of 1 is traced as
a batch of 2). Every other dim stays static: rewrites made for the captured resolution (bias maps) stay valid.
Graphs that dynamo hands a backend come in through `backend.py` instead and meet the same passes.
"""
from __future__ import annotations

import copy

import torch
from torch import fx
from torch._dynamo.convert_frame import compile_lock
from torch.utils import _pytree as pytree

from .errors import CaptureError

EXPORT_LOCK = compile_lock  # dynamo's own (re-entrant) lock: exports wait for compilations and vice versa


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


def batch_size(example_inputs) -> int | None:
    """The leading size of the first tensor input with at least one dim, None without one."""
    tensors = [t for t in pytree.tree_leaves(example_inputs) if isinstance(t, torch.Tensor) and t.dim()]
    return tensors[0].shape[0] if tensors else None


def export_arguments(example_inputs, dynamic_batch: bool) -> tuple[tuple, tuple | None]:
    """The inputs to trace and the `dynamic_shapes` for torch.export: with `dynamic_batch`, dim 0 of every
    tensor input of the batch's leading size is `batch`, and a batch of 1 is repeated to 2."""
    example_inputs = tuple(example_inputs)
    if not dynamic_batch:
        return example_inputs, None
    batch, dim = batch_size(example_inputs), torch.export.Dim("batch")

    def is_batched(value) -> bool:
        return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch

    dynamic_shapes = pytree.tree_map(lambda t: {0: dim} if is_batched(t) else None, example_inputs)
    if batch == 1:
        example_inputs = pytree.tree_map(lambda t: torch.cat([t, t]) if is_batched(t) else t, example_inputs)
    return example_inputs, dynamic_shapes


def export_program(model: torch.nn.Module, example_inputs, dynamic_batch: bool = False
                   ) -> torch.export.ExportedProgram:
    """torch.export of `model` (the module itself: callers pass a private copy) under the export lock."""
    example_inputs, dynamic_shapes = export_arguments(example_inputs, dynamic_batch)
    with EXPORT_LOCK:
        return torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes)


def private_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `model`. Tensors computed from parameters and stored as plain attributes (the `weight`
    of a conv pruned with torch.nn.utils.prune, recomputed by its forward pre-hook) refuse deepcopy: they are
    copied detached."""
    computed = {id(value): value.detach().clone() for module in model.modules() for value in vars(module).values()
                if isinstance(value, torch.Tensor) and not value.is_leaf}
    try:
        return copy.deepcopy(model, computed)
    except Exception as error:  # deepcopy raises whatever an attribute's __deepcopy__ raises
        raise CaptureError(f"could not copy {type(model).__name__} before capturing it (copy.deepcopy failed: "
                           f"{error}); fxcompress never traces the caller's own module") from error


def capture(model: torch.nn.Module, example_inputs, dynamic_batch: bool = False) -> fx.GraphModule:
    """Export a private copy of `model` on `example_inputs` (or take a saved ExportedProgram, re-exported
    for a dynamic batch if asked) and return its graph, editable and in inference mode."""
    example_inputs = check_inputs(model, example_inputs)
    if isinstance(model, torch.export.ExportedProgram):
        if not dynamic_batch:
            return mark_inference(copy.deepcopy(model.module()))
        model = model.module()
    private = private_copy(model)
    try:
        exported = export_program(private, example_inputs, dynamic_batch)
    except Exception as error:  # torch.export raises many unrelated types; all mean "not capturable"
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        how = " with a dynamic batch dimension (pass dynamic_batch=False to fix the batch size)" \
            if dynamic_batch else ""
        raise CaptureError(f"torch.export could not capture {type(model).__name__}{how}: {first_line}") from error
    return mark_inference(exported.module())


def mark_inference(model: torch.nn.Module) -> torch.nn.Module:
    """Set every `training` flag of `model` to False, in place: an exported graph is an inference graph (it
    was captured from a model in eval mode), but its `eval()` raises NotImplementedError."""
    for module in model.modules():
        module.training = False
    return model
