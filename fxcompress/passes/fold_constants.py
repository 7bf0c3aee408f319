"""fold_constants: replace each op computed from constants alone by one constant.

A pruned conv (`torch.nn.utils.prune`: weight = weight_orig * weight_mask in a forward pre-hook) or a
parametrised one (`weight_norm`, `parametrizations.*`) computes its weight at every call, so the merge
passes, which need constant weights, could not read it. This pass evaluates every op whose inputs are all
constants (`get_attr` tensors; literals are fine) and replaces it by a `get_attr` of the result, in graph
order, so chains of such ops fold completely.

Reads nothing from `node.meta`; writes new constants and drops the guards (`is_guard`) that only check a
constant. Runs first in the exact pipeline, before `fold_batchnorm` and the merges. Deliberately not folded,
each reported with its reason: an op that writes in place, a value that some op writes in place (or a view
of one), an op that draws random numbers (an aten op tagged `nondeterministic_seeded` while it runs), a
result that is not a tensor, and a result with more than `MAX_EXPANSION` times the elements of its inputs
(an expand or broadcast would be stored at full size).
"""
from functools import partial
from typing import Iterator

import torch
from torch import fx
from torch.utils._python_dispatch import TorchDispatchMode

from ..context import PassContext, Site
from ..graph import add_constant, constant, is_guard, real_users, stable_name, writes_in_place
from ..errors import NoMatch
from ..ops import bind

MAX_EXPANSION = 8
# op-table kinds whose output is a new tensor, never a view of an input (dropout in eval mode returns its input)
_FRESH_OUTPUT_KINDS = {"conv", "linear", "batch_norm", "pool", "concat", "add", "activation"}


class _OpRecorder(TorchDispatchMode):
    """Records the aten ops a call runs."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def _is_random(node: fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags


def _may_write_inputs(node: fx.Node) -> bool:
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    return node.op in ("call_function", "call_method") and not is_guard(node) and writes_in_place(node)


def _written_in_place(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value an in-place op may write: its inputs, and whatever those may be views of."""
    stack = [arg for node in gm.graph.nodes if _may_write_inputs(node) for arg in node.all_input_nodes]
    written: set[fx.Node] = set()
    while stack:
        node = stack.pop()
        if node in written:
            continue
        written.add(node)
        call = bind(node)
        if call is None or call.kind not in _FRESH_OUTPUT_KINDS or _may_write_inputs(node):
            stack.extend(node.all_input_nodes)
    return written


def _constant_inputs(gm: fx.GraphModule, node: fx.Node) -> dict[fx.Node, torch.Tensor] | None:
    inputs = {arg: constant(gm, arg) for arg in node.all_input_nodes}
    return inputs if inputs and all(value is not None for value in inputs.values()) else None


@torch.no_grad()
def _evaluate(node: fx.Node, inputs: dict[fx.Node, torch.Tensor]):
    """(result, the aten ops it ran, whether it wrote an input), run on copies of the inputs."""
    copies = {arg: value.clone() for arg, value in inputs.items()}
    args = fx.node.map_arg(node.args, copies.__getitem__)
    kwargs = fx.node.map_arg(node.kwargs, copies.__getitem__)
    with _OpRecorder() as recorder:
        if node.op == "call_method":
            result = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            result = node.target(*args, **kwargs)
    return result, recorder.ops, any(copy._version != 0 for copy in copies.values())


def _fold(node: fx.Node, inputs: dict[fx.Node, torch.Tensor], written: set[fx.Node]):
    """The constant value of `node`, or why it stays computed."""
    if _is_random(node):
        return NoMatch("draws random numbers")
    if writes_in_place(node):
        return NoMatch("writes in place or has side effects")
    if node in written or any(arg in written for arg in inputs):
        return NoMatch("its value or an input is written in place")
    result, ops, wrote = _evaluate(node, inputs)
    if wrote:
        return NoMatch("writes its inputs in place")
    if any(torch.Tag.nondeterministic_seeded in op.tags for op in ops):
        return NoMatch("draws random numbers")
    if not isinstance(result, torch.Tensor):
        return NoMatch(f"result is a {type(result).__name__}, not a tensor")
    input_elements = sum(value.numel() for value in inputs.values())
    if result.numel() > MAX_EXPANSION * max(input_elements, 1):
        return NoMatch(f"result has {result.numel()} elements, over {MAX_EXPANSION}x its inputs' {input_elements} "
                       "(an expand or broadcast is not stored)")
    return result


def _drop_constant_guards(gm: fx.GraphModule, constants) -> None:
    """Erase guards on constants that nothing else reads any more (a constant cannot fail its guard)."""
    for node in constants:
        if node.users and not real_users(node):
            for guard in list(node.users):
                gm.graph.erase_node(guard)


def _replace_by_constant(gm: fx.GraphModule, node: fx.Node, value: torch.Tensor, inputs) -> None:
    folded = add_constant(gm, f"folded_{node.name}", value, before=node)
    node.replace_all_uses_with(folded)
    gm.graph.erase_node(node)
    _drop_constant_guards(gm, inputs)


def fold_constants(gm: fx.GraphModule, ctx: PassContext) -> Iterator[Site]:
    written = _written_in_place(gm)
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method") or is_guard(node) or not real_users(node):
            continue
        inputs = _constant_inputs(gm, node)
        if inputs is None:
            continue
        name = stable_name(node)
        value = _fold(node, inputs, written)
        if isinstance(value, NoMatch):
            ctx.skip(name, f"not folded into a constant: {value}")
            continue
        yield Site(name, partial(_replace_by_constant, gm, node, value, inputs),
                   detail="computed from constants only: folded")
