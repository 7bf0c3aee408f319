"""capture: how a graph comes in. An nn.Module and example inputs become an FX GraphModule through
torch.export (`capture`); a graph that dynamo hands the `depthprune` backend gets its weight placeholders
baked into constants (`bake_weights`). Both then take the same path (`compiler.compress_captured`).

The result is a private copy: export runs on a deep copy of the caller's model, so passes may edit the graph
and its weights in place, and an export that fails half-way cannot leave the caller's parameters swapped for
the fake tensors it traces with. torch.export is not thread-safe and shares tracing state with dynamo: every
export holds dynamo's compile lock, so exports run one at a time and never beside a torch.compile
compilation in another thread.

With `dynamic_batch`, dim 0 of every tensor input whose leading size is the batch's becomes one symbolic
size, so the graph runs on any batch size (export specialises sizes 0 and 1, so a batch of 1 is traced as
a batch of 2). Every other dim stays static: rewrites made for the captured resolution (bias maps) stay valid.

Dynamo passes weights as graph inputs. `weight_placeholders` finds the inputs used only as weights, biases or
statistics of the ops the passes rewrite (directly or through ops that compute a weight from them, such as a
prune mask), `scalar_placeholders` the 0-d module attributes read with `.item()`; `bake_weights` turns both
into constants of a copy of the graph. The backend checks at each call that the baked tensors are unchanged
(`dynamo_backend`).
"""
from __future__ import annotations

import copy
import itertools
import warnings

import torch
from torch import fx
from torch._dynamo.convert_frame import compile_lock
from torch.utils import _pytree as pytree

from . import meta
from .errors import CaptureError
from .graph import graph_inputs, is_guard, writes_in_place
from .ops import bind

EXPORT_LOCK = compile_lock  # dynamo's own (re-entrant) lock: exports wait for compilations and vice versa


def is_planned(model) -> bool:
    """Whether `model` was made by `trainable.apply_plan` (it carries its plan and edits its calls at run time)."""
    return isinstance(model, torch.nn.Module) and meta.PLAN in model.__dict__


def check_inputs(model, example_inputs) -> tuple:
    if not isinstance(model, (torch.nn.Module, torch.export.ExportedProgram)):
        raise CaptureError(f"expected a torch.nn.Module or ExportedProgram, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise CaptureError("example_inputs must be a tensor or a non-empty tuple of inputs")
    if is_planned(model):
        raise CaptureError(f"{type(model).__name__} was made by apply_plan and edits its calls at run time, which "
                           "export would trace wrongly: compress it with fxcompress.compress, which captures its "
                           "original class and applies its plan")
    if isinstance(model, torch.nn.Module):
        check_devices(model, example_inputs)
    if isinstance(model, torch.nn.Module) and model.training:
        raise CaptureError(f"{type(model).__name__} is in training mode (BatchNorm statistics and dropout are "
                           "live); call model.eval() before compressing it")
    if isinstance(model, torch.export.ExportedProgram):
        check_program_inputs(model, example_inputs)
    return tuple(example_inputs)


def check_devices(model: torch.nn.Module, example_inputs) -> None:
    """Refuse example inputs on another device than the model's weights (0-d tensors aside: torch mixes them)."""
    weights = {t.device for t in itertools.chain(model.parameters(), model.buffers())}
    inputs = {t.device for t in pytree.tree_leaves(example_inputs) if isinstance(t, torch.Tensor) and t.dim()}
    if len(weights) == 1 and inputs and inputs != weights:
        (device,) = weights
        raise CaptureError(f"{type(model).__name__} is on {device} but its example inputs are on "
                           f"{', '.join(sorted(map(str, inputs)))}: move them to {device} (or the model to theirs)")


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
    with EXPORT_LOCK, warnings.catch_warnings():
        # a pruned weight (torch.nn.utils.prune) is a plain attribute its forward pre-hook assigns: expected here
        warnings.filterwarnings("ignore", "The tensor attributes? .* (was|were) assigned during export")
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


WEIGHT_PARAMS = {"weight", "bias", "running_mean", "running_var", "bias_map"}


def weight_placeholders(gm: fx.GraphModule, example_inputs) -> list[int]:
    """Indices of placeholders used only as weights, biases or statistics of ops the passes rewrite, directly
    or through ops that compute a weight from them (a prune mask, weight_norm: `fold_constants` folds those)."""
    indices = []
    for index, (node, value) in enumerate(zip(graph_inputs(gm), example_inputs)):
        uses = [user for user in node.users if not is_guard(user)]
        if isinstance(value, torch.Tensor) and uses and all(_is_weight_use(user, node) for user in uses):
            indices.append(index)
    return indices


def scalar_placeholders(gm: fx.GraphModule, example_inputs) -> list[int]:
    """Indices of 0-d tensors read only through `.item()`: module attributes such as a BatchNorm eps or a
    dropout probability, which dynamo passes as inputs when compiling with dynamic=True."""
    indices = []
    for index, (node, value) in enumerate(zip(graph_inputs(gm), example_inputs)):
        if isinstance(value, torch.Tensor) and value.dim() == 0 and node.users and \
                all(user.op == "call_method" and user.target == "item" for user in node.users):
            indices.append(index)
    return indices


def _is_weight_use(user: fx.Node, value: fx.Node) -> bool:
    call = bind(user)
    if call is None or call.kind not in ("conv", "linear", "batch_norm"):
        return _is_derived_weight(user)
    if call.kind == "batch_norm" and call["training"] is not False:
        return False  # training mode updates the running statistics in place: they must stay the caller's
    return any(arg is value for name, arg in call.args.items() if name in WEIGHT_PARAMS) and \
        call.args.get("input") is not value


def _is_derived_weight(node: fx.Node) -> bool:
    """Whether `node` computes a weight from weights (weight_orig * weight_mask of a pruned conv, a
    weight_norm): no in-place write, every use a weight use or the graph output (where dynamo returns the
    weight that a forward pre-hook stores on the module), and at least one use a weight use."""
    if node.op not in ("call_function", "call_method") or writes_in_place(node):
        return False
    uses = [user for user in node.users if not is_guard(user) and user.op != "output"]
    return bool(uses) and all(_is_weight_use(user, node) for user in uses)


def bake_weights(gm: fx.GraphModule, example_inputs, weights: list[int], scalars: list[int] = ()
                 ) -> fx.GraphModule:
    """A copy of `gm` in which the placeholders at `weights` are constants holding copies of those tensors
    and the `.item()` reads of the placeholders at `scalars` are their values."""
    baked = fx.GraphModule(torch.nn.Module(), fx.Graph())
    env: dict[fx.Node, object] = {}
    for index, node in enumerate(graph_inputs(gm)):
        if index in weights:
            name = f"baked_{node.name}"
            baked.register_buffer(name, example_inputs[index].detach().clone())
            env[node] = baked.graph.get_attr(name)
        elif index in scalars:
            for item in node.users:
                env[item] = example_inputs[index].item()
        else:
            env[node] = baked.graph.node_copy(node, lambda n: env[n])
    for node in gm.graph.nodes:
        if node.op != "placeholder" and node not in env:
            env[node] = baked.graph.node_copy(node, lambda n: env[n])
    baked.recompile()
    return baked
