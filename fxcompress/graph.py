"""Small FX helpers shared by the passes: constants, users, names, shapes."""
from __future__ import annotations

import copy
import operator
import re
from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx

from . import meta
from .ops import bind, op_name
from .verify import fresh

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
    base = re.sub(r"\W", "_", hint)  # no dots: a top-level attribute, so hasattr sees every clash
    name, index = base, 0
    while hasattr(gm, name):
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
def annotate_shapes(gm: fx.GraphModule, inputs):
    """Replay the graph on fresh copies of `inputs` (it may write into them), store every tensor output's
    shape under `meta.SHAPE` and return the graph's output."""
    return _ShapeRecorder(gm).run(*fresh(inputs))


def graph_inputs(gm: fx.GraphModule) -> list[fx.Node]:
    return [node for node in gm.graph.nodes if node.op == "placeholder"]


def channel_axis(node: fx.Node) -> int:
    """The channel axis of a node's output: last for token layouts (N, T, C) made by a linear, else 1
    (N, C, ...) and (N, F). Found from the nearest conv, linear or batch_norm up the first-input chain."""
    current = node
    while isinstance(current, fx.Node):
        call = bind(current)
        if call is not None and call.kind in ("conv", "batch_norm"):
            return 1
        if call is not None and call.kind == "linear":
            return len(tensor_shape(node) or (0, 0)) - 1
        current = current.args[0] if current.args else None
    shape = tensor_shape(node)
    return len(shape) - 1 if shape is not None and len(shape) == 3 else 1


def channel_width(node: fx.Node) -> int | None:
    """The size of a node's channel axis (`channel_axis`), or None where it has none (fewer than 2 dims)."""
    shape = tensor_shape(node)
    return shape[channel_axis(node)] if shape is not None and len(shape) >= 2 else None


def nodes_of_kind(gm: fx.GraphModule, *kinds: str) -> list[fx.Node]:
    """The nodes whose op-table kind is one of `kinds`, in graph order."""
    return [n for n in gm.graph.nodes if (c := bind(n)) is not None and c.kind in kinds]


def names_of_kind(gm: fx.GraphModule, *kinds: str) -> list[str]:
    """Stable names of the nodes whose op-table kind is one of `kinds`, in graph order."""
    return [stable_name(n) for n in nodes_of_kind(gm, *kinds)]


def module_of(name: str) -> str:
    """The module path of a stable name `<module path>:<op>#k`."""
    return name.rpartition(":")[0]


def module_path(node: fx.Node) -> str:
    """The dotted path of the innermost module that produced `node`, the same for export and dynamo."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return normalize_path(list(stack.values())[-1][0])


def normalize_path(path: str) -> str:
    """A module path as written by dynamo (`L['self'].layers[0]`, `L['self']._modules['layers']`, or
    `L['self'].__dict__['_modules']['layers']` below a module that defines __getattr__, as diffusers' models do)
    or by export (`layers.0`), as `layers.0`."""
    path = re.sub(r"\.(?:__dict__\['_modules'\]|_modules)\['([^']+)'\]", r".\1", path)
    path = re.sub(r"^L\['[^']+'\]\.?", "", path)
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


INHERITED_META = ("nn_module_stack", "stack_trace", meta.SHAPE)  # module, source line, output shape


def name_new_node(node: fx.Node, like: fx.Node) -> None:
    """Give `node`, written by a pass in place of `like` (with an output of the same shape), `like`'s module,
    source line and shape, and a stable name of its own in the `annotate_names` form, `<module path>:<op>#k`,
    unique in the graph."""
    node.meta.update({key: like.meta[key] for key in INHERITED_META if key in like.meta})
    base = f"{module_path(node) or 'root'}:{op_name(node)}"
    taken = {stable_name(other) for other in node.graph.nodes if other is not node}
    name, count = base, 0
    while name in taken:
        count += 1
        name = f"{base}#{count}"
    node.meta[meta.STABLE_NAME] = name


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


_IN_PLACE_OPERATORS = {"setitem", "iadd", "isub", "imul", "imatmul", "itruediv", "ifloordiv", "imod", "ipow",
                       "iand", "ior", "ixor", "ilshift", "irshift"}


def writes_in_place(node: fx.Node) -> bool:
    """Whether `node` may write into an input (`y.mul_(2)`, `F.relu(y, inplace=True)`, `y += x`, `y[i] = v`):
    such a node has an effect even when its result is unused, so dead-code elimination must keep it."""
    if node.is_impure():
        return True
    if node.op not in ("call_method", "call_function"):
        return False
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name.strip("_") in _IN_PLACE_OPERATORS or (name.endswith("_") and not name.endswith("__")):
        return True
    call = bind(node)
    return bool(node.kwargs.get("inplace") or (call is not None and call.args.get("inplace")))


@dataclass(frozen=True)
class Snapshot:
    """A graph as it was, to roll back to: its nodes and the objects its `get_attr` and `call_module` nodes read
    (shared, not copied: passes never write a tensor in place, they register new constants)."""

    graph: fx.Graph
    attributes: dict[str, object]

    @classmethod
    def of(cls, gm: fx.GraphModule) -> "Snapshot":
        graph = copy.deepcopy(gm.graph)
        return cls(graph, {node.target: operator.attrgetter(node.target)(gm) for node in graph.nodes
                           if node.op in ("get_attr", "call_module")})

    def restore(self, gm: fx.GraphModule) -> None:
        """Put `gm` back as it was, in place (a GraphModule keeps attributes that its graph does not show)."""
        for target, value in self.attributes.items():
            _set_attribute(gm, target, value)
        gm.graph = copy.deepcopy(self.graph)

    def module(self) -> fx.GraphModule:
        """A new GraphModule as `gm` was."""
        return fx.GraphModule(self.attributes, copy.deepcopy(self.graph))


def _set_attribute(gm: fx.GraphModule, target: str, value) -> None:
    *path, leaf = target.split(".")
    owner = gm
    for name in path:
        if not hasattr(owner, name):
            owner.add_module(name, torch.nn.Module())
        owner = getattr(owner, name)
    if isinstance(value, torch.nn.Parameter):
        owner.register_parameter(leaf, value)
    elif isinstance(value, torch.Tensor):
        owner.register_buffer(leaf, value)
    else:
        setattr(owner, leaf, value)


def remove_unused_constants(gm: fx.GraphModule) -> None:
    """Delete dead nodes (keeping in-place writes), unused `get_attr` nodes and the parameters only they
    referenced."""
    gm.graph.eliminate_dead_code(is_impure_node=writes_in_place)
    used = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            owner_path, _, leaf = name.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            owner._parameters.pop(leaf, None)
            owner._buffers.pop(leaf, None)
    gm.recompile()
