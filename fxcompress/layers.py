"""Read conv/linear nodes as math specs (`merge_math`) and write specs back as nodes.

Readers return the spec, or a `NoMatch` (a falsy string) saying why the node cannot take part in a merge,
so that a pass can skip it and report the reason. A node written here inherits only the module, source line
and shape of the node it replaces (`graph.name_new_node`) and gets a stable name of its own.
"""
from __future__ import annotations

from torch import fx

from .errors import NoMatch
from .graph import add_constant, constant, name_new_node, real_users, replace_node, stable_name, tensor_shape
from .merge_math import ConvSpec, LinearSpec, numeric_padding
from .ops import CONV_BY_DIMS, OpCall, aten, as_tuple, bind, conv_with_bias_map


def _optional_constant(gm: fx.GraphModule, value, what: str):
    if value is None:
        return None, ""
    tensor = constant(gm, value)
    return (tensor, "") if tensor is not None else (None, f"{what} is computed at run time")


def read_conv(gm: fx.GraphModule, call: OpCall) -> ConvSpec | NoMatch:
    weight = constant(gm, call["weight"])
    if weight is None:
        return NoMatch("conv weight is computed at run time")
    dims = weight.dim() - 2
    if call.args.get("transposed"):
        return NoMatch("transposed convolution")
    stride, dilation = as_tuple(call["stride"], dims), as_tuple(call.args.get("dilation", 1), dims)
    padding = call["padding"]
    if isinstance(padding, str):
        try:
            padding = numeric_padding(padding, weight.shape[2:], stride, dilation)
        except ValueError as error:
            return NoMatch(str(error))
    bias, why = _optional_constant(gm, call["bias"], "conv bias")
    bias_map, why_map = _optional_constant(gm, call.args.get("bias_map"), "bias map")
    if why or why_map:
        return NoMatch(why or why_map)
    return ConvSpec(weight.detach(), None if bias is None else bias.detach(), stride, as_tuple(padding, dims),
                    int(call["groups"]), None if bias_map is None else bias_map.detach()[0], dilation)


def read_linear(gm: fx.GraphModule, call: OpCall) -> LinearSpec | NoMatch:
    weight = constant(gm, call["weight"])
    if weight is None:
        return NoMatch("linear weight is computed at run time")
    bias, why = _optional_constant(gm, call["bias"], "linear bias")
    if why:
        return NoMatch(why)
    return LinearSpec(weight.detach(), None if bias is None else bias.detach())


def spatial_size(node: fx.Node) -> tuple[int, ...] | None:
    shape = tensor_shape(node)
    return None if shape is None else tuple(shape[2:])


def emit_conv(gm: fx.GraphModule, input: fx.Node, spec: ConvSpec, *, replacing: fx.Node) -> fx.Node:
    """Insert `spec` applied to `input` just before `replacing` and return the new node."""
    hint = stable_name(replacing).replace(":", "_")
    weight = add_constant(gm, f"{hint}_weight", spec.weight, before=replacing)
    bias = None if spec.bias is None else add_constant(gm, f"{hint}_bias", spec.bias, before=replacing)
    dims = spec.spatial_dims
    with gm.graph.inserting_before(replacing):
        if spec.bias_map is None:
            node = gm.graph.call_function(CONV_BY_DIMS[dims], (input, weight, bias, list(spec.stride),
                                                               list(spec.padding), list(spec.dilation), spec.groups))
        else:
            bias_map = add_constant(gm, f"{hint}_bias_map", spec.bias_map.unsqueeze(0), before=replacing)
            node = gm.graph.call_function(conv_with_bias_map, (input, weight, bias, list(spec.stride),
                                                                list(spec.padding), spec.groups, bias_map))
    name_new_node(node, replacing)
    return node


def emit_linear(gm: fx.GraphModule, input: fx.Node, spec: LinearSpec, *, replacing: fx.Node) -> fx.Node:
    hint = stable_name(replacing).replace(":", "_")
    weight = add_constant(gm, f"{hint}_weight", spec.weight, before=replacing)
    bias = None if spec.bias is None else add_constant(gm, f"{hint}_bias", spec.bias, before=replacing)
    with gm.graph.inserting_before(replacing):
        node = gm.graph.call_function(aten.linear.default, (input, weight, bias))
    name_new_node(node, replacing)
    return node


def find_chains(gm: fx.GraphModule, kind: str, read) -> list[list[tuple[OpCall, object]]]:
    """Maximal chains of readable `kind` ops in which each op's only user is the next op of the chain."""
    chains: list[list[tuple[OpCall, object]]] = []
    chain_of: dict[fx.Node, list] = {}
    for node in gm.graph.nodes:
        call = bind(node)
        if call is None or call.kind != kind:
            continue
        spec = read(gm, call)
        if not spec:
            continue
        producer = call["input"]
        chain = chain_of.get(producer)
        if chain is not None and chain[-1][0].node is producer and real_users(producer) == [node]:
            chain.append((call, spec))
        else:
            chain = [(call, spec)]
            chains.append(chain)
        chain_of[node] = chain
    return [chain for chain in chains if len(chain) > 1]


def replace_chain(gm: fx.GraphModule, members: list[fx.Node], spec) -> None:
    """Replace a chain of convs or linears (`find_chains`) by one op applying `spec` to the chain's input."""
    emit = emit_conv if isinstance(spec, ConvSpec) else emit_linear
    replace_node(members[-1], emit(gm, bind(members[0])["input"], spec, replacing=members[-1]))
    for node in reversed(members[:-1]):
        gm.graph.erase_node(node)
