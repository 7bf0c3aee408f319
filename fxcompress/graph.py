"""Small FX helpers shared by the passes: constants, users, names, shapes."""
from __future__ import annotations

import operator
import re
from collections import Counter

import torch
from torch import fx

from . import meta
from .ops import bind, op_name

_GUARD_TARGETS = {torch.ops.aten._assert_tensor_metadata.default, torch._assert}


def is_guard(node: fx.Node) -> bool:
    """Nodes that only check inputs (export's `_guards_fn`, tensor-metadata asserts): not real users."""
    return (node.op == "call_module" and str(node.target).startswith("_guards")) or node.target in _GUARD_TARGETS


def real_users(node: fx.Node) -> list[fx.Node]:
    return [user for user in node.users if not is_guard(user)]


def constant(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The tensor behind a `get_attr` node, or None for anything computed at run time."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = operator.attrgetter(node.target)(gm)
    return value if isinstance(value, torch.Tensor) else None


def add_constant(gm: fx.GraphModule, hint: str, value: torch.Tensor, *, before: fx.Node) -> fx.Node:
    """Register `value` on `gm` under a fresh name and return a `get_attr` node for it."""
    base = re.sub(r"\W", "_", hint)
    taken = {name for name, _ in gm.named_parameters()} | {name for name, _ in gm.named_buffers()}
    name, index = base, 0
    while name in taken or hasattr(gm, name):
        index += 1
        name = f"{base}_{index}"
    gm.register_parameter(name, torch.nn.Parameter(value.detach().clone(), requires_grad=False))
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(name)


def tensor_shape(node) -> torch.Size | None:
    return node.meta.get(meta.SHAPE) if isinstance(node, fx.Node) else None


class _ShapeRecorder(fx.Interpreter):
    """Runs on real tensors (ShapeProp would switch to fake ones inside a dynamo backend)."""

    def run_node(self, node: fx.Node):
        result = super().run_node(node)
        node.meta[meta.SHAPE] = result.shape if isinstance(result, torch.Tensor) else None
        return result


@torch.no_grad()
def annotate_shapes(gm: fx.GraphModule, inputs) -> None:
    """Replay the graph on `inputs` and store every tensor output's shape under `meta.SHAPE`."""
    _ShapeRecorder(gm).run(*inputs)


def module_path(node: fx.Node) -> str:
    """The dotted path of the innermost module that produced `node`, the same for export and dynamo."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['[^']+'\]\.?", "", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.lstrip(".")


def annotate_names(gm: fx.GraphModule) -> None:
    """Give each op node a stable name `<module path>:<op>[#k]` (k-th call of that op in that module)."""
    seen: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op != "call_function" or is_guard(node):
            continue
        key = f"{module_path(node) or 'root'}:{op_name(node)}"
        count = seen[key]
        seen[key] += 1
        node.meta[meta.STABLE_NAME] = key if count == 0 else f"{key}#{count}"


def stable_name(node: fx.Node) -> str:
    return node.meta.get(meta.STABLE_NAME, node.name)


def replace_node(old: fx.Node, new: fx.Node) -> None:
    """Route all users of `old` (or of the getitem that unpacks it) to `new`, then drop `old`."""
    call = bind(old)
    output = call.output if call is not None else old
    output.replace_all_uses_with(new)
    if output is not old:
        output.graph.erase_node(output)
    for user in list(old.users):
        if is_guard(user):
            old.graph.erase_node(user)
    old.graph.erase_node(old)


def remove_unused_constants(gm: fx.GraphModule) -> None:
    """Delete `get_attr` nodes without users and the parameters only they referenced."""
    gm.graph.eliminate_dead_code()
    used = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            owner_path, _, leaf = name.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            owner._parameters.pop(leaf, None)
            owner._buffers.pop(leaf, None)
    gm.recompile()
