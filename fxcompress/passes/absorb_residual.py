"""absorb_residual: turn `conv(x) + x` and `conv_a(x) + conv_b(x)` into one conv.

An identity shortcut becomes a Dirac tap (needs equal channels and an output the size of x: odd kernel,
"same" padding); a 1x1 strided downsample shortcut (its BatchNorm already folded) lands on tap P of the
main kernel (`merge_math.add_parallel_convs`). Exact. Dilated convs are refused with a reason. Needs each
conv's only user to be the add; applied when it costs no more (MACs or measured latency) and parameters than
the branches, or with `force`. Reads `meta.SHAPE`.
"""
from functools import partial
from typing import Iterator

from torch import fx

from ..context import PassContext, Site
from ..cost import merge_costs
from ..graph import real_users, replace_node, stable_name, tensor_shape
from ..errors import NoMatch
from ..layers import emit_conv, read_conv, spatial_size
from ..merge_math import add_parallel_convs, identity_conv
from ..ops import OpCall, bind


def _branch(gm: fx.GraphModule, operand, add: fx.Node):
    """(input node, conv spec or None for an identity branch)."""
    call = bind(operand) if isinstance(operand, fx.Node) else None
    if call is not None and call.kind == "conv" and real_users(operand) == [add]:
        spec = read_conv(gm, call)
        return (call["input"], spec) if spec else (operand, None)
    return operand, None


def _match(gm: fx.GraphModule, add: OpCall):
    if add["alpha"] != 1:
        return NoMatch("add with alpha != 1")
    operands = (add["input"], add["other"])
    if not all(isinstance(op, fx.Node) and tensor_shape(op) == tensor_shape(add.node) for op in operands):
        return NoMatch("operands are not two tensors of the output's shape")
    (input_a, spec_a), (input_b, spec_b) = (_branch(gm, op, add.node) for op in operands)
    if spec_a is None and spec_b is None:
        return NoMatch("no operand is a conv used only by this add")
    if spec_a is None or spec_b is None:
        conv_input, spec = (input_b, spec_b) if spec_a is None else (input_a, spec_a)
        shortcut = input_a if spec_a is None else input_b
        if shortcut is not conv_input:
            return NoMatch("the shortcut is not the conv's input")
        identity = identity_conv(spec.in_channels, spec.spatial_dims, spec.weight.dtype, spec.weight.device)
        spec_a, spec_b, input_a = spec, identity, conv_input
        if spec.in_channels != spec.out_channels:
            return NoMatch("identity shortcut around a conv that changes the channel count")
    elif input_a is not input_b:
        return NoMatch("the two convs read different inputs")
    try:
        merged = add_parallel_convs(spec_a, spec_b, spatial_size(input_a))
    except ValueError as error:
        return NoMatch(str(error))
    return input_a, spec_a, spec_b, merged


def _absorb(gm: fx.GraphModule, add: fx.Node, conv_input: fx.Node, branches: list[fx.Node], merged) -> None:
    replace_node(add, emit_conv(gm, conv_input, merged, replacing=add))
    for branch in branches:
        if not branch.users:
            gm.graph.erase_node(branch)


def absorb_residual(gm: fx.GraphModule, ctx: PassContext) -> Iterator[Site]:
    for node in list(gm.graph.nodes):
        add = bind(node)
        if add is None or add.kind != "add":
            continue
        name = stable_name(node)
        match = _match(gm, add)
        if not match:
            ctx.skip(name, match)
            continue
        conv_input, spec_a, spec_b, merged = match
        shape = (tensor_shape(conv_input), spatial_size(node))
        branches_cost = [ctx.cost.conv(spec, *shape) for spec in (spec_a, spec_b)]  # identity: a depthwise 1x1
        cost, params = ctx.cost.conv(merged, *shape)
        if not ctx.config.force and (cost > sum(c[0] for c in branches_cost) or
                                     params > sum(c[1] for c in branches_cost)):
            ctx.skip(name, f"absorbing the shortcut would raise the {ctx.cost.kind} cost")
            continue
        branches = [op for op in (add["input"], add["other"]) if op is not conv_input]
        yield Site(name, partial(_absorb, gm, node, conv_input, branches, merged),
                   (*(stable_name(branch) for branch in branches), name),
                   detail=f"shortcut absorbed, kernel {merged.kernel_size}",
                   **merge_costs(ctx.cost, "conv", [(spec_a, *shape), (spec_b, *shape)], (merged, *shape)))
