"""fold_batchnorm: fold an eval-mode BatchNorm into the conv or linear that feeds it.

W' = s * W and b' = s * (b - mean) + beta with s = gamma / sqrt(var + eps), per output channel
(`merge_math.fold_batchnorm_into`); stride, padding and dilation do not matter to a fold. Needs: the producer's
only user is the BatchNorm; weights and statistics are constants (`fold_constants` first turns weights
computed from parameters alone, such as prune masks and weight_norm, into constants); a conv readable by
`layers.read_conv` (padding "same" with an even kernel is not); for a linear producer, a 2-d output
(BatchNorm1d over features). Does not handle a BatchNorm before its conv (pre-activation networks) nor one
in training mode. A site it cannot read is skipped with the reason.
"""
from functools import partial
from typing import Iterator

from torch import fx

from ..context import PassContext, Site
from ..errors import NoMatch
from ..graph import constant, real_users, replace_node, stable_name, tensor_shape
from ..layers import emit_conv, emit_linear, read_conv, read_linear
from ..merge_math import ConvSpec, fold_batchnorm_into
from ..ops import OpCall, bind


def _statistics(gm: fx.GraphModule, bn: OpCall) -> dict | NoMatch:
    values = {}
    for name in ("running_mean", "running_var", "weight", "bias"):
        if bn[name] is None:
            if name.startswith("running"):
                return NoMatch("batch_norm without running statistics")
            values[name] = None
            continue
        values[name] = constant(gm, bn[name])
        if values[name] is None:
            return NoMatch(f"batch_norm {name} is computed at run time")
    return values


def _match(gm: fx.GraphModule, bn: OpCall):
    if bn["training"] is not False:
        return NoMatch("batch_norm in training mode")
    if not isinstance(bn["eps"], (int, float)):
        return NoMatch("batch_norm eps is not a constant")
    producer = bind(bn["input"]) if isinstance(bn["input"], fx.Node) else None
    if producer is None or producer.kind not in ("conv", "linear"):
        return NoMatch("input is not a conv or linear")
    users = len(real_users(producer.node))
    if users != 1:
        return NoMatch(f"{stable_name(producer.node)} output has {users} users")
    if producer.kind == "linear" and len(tensor_shape(producer.node) or ()) != 2:
        return NoMatch("batch_norm after a linear whose output is not 2-d")
    spec = read_conv(gm, producer) if producer.kind == "conv" else read_linear(gm, producer)
    statistics = _statistics(gm, bn)
    if not spec:
        return spec
    if not statistics:
        return statistics
    return producer, spec, statistics


def _fold(gm: fx.GraphModule, bn: OpCall, producer: OpCall, spec, stats: dict) -> None:
    folded = fold_batchnorm_into(spec, stats["running_mean"], stats["running_var"], stats["weight"], stats["bias"],
                                 float(bn["eps"]))
    emit = emit_conv if isinstance(folded, ConvSpec) else emit_linear
    new = emit(gm, producer["input"], folded, replacing=producer.node)
    replace_node(bn.node, new)
    replace_node(producer.node, new)


def fold_batchnorm(gm: fx.GraphModule, ctx: PassContext) -> Iterator[Site]:
    for node in list(gm.graph.nodes):
        bn = bind(node)
        if bn is None or bn.kind != "batch_norm":
            continue
        name = stable_name(node)
        match = _match(gm, bn)
        if not match:
            ctx.skip(name, match)
            continue
        producer, spec, stats = match
        yield Site(name, partial(_fold, gm, bn, producer, spec, stats), (stable_name(producer.node), name),
                   detail="batch_norm folded")
