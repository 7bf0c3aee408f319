"""remove_channels: remove the channels a plan names from a channel group, structurally.

Reads the plan's `remove_channels` decisions (target: an activation or a residual add; params: {"channels":
[indices]}, checked by `REMOVE_CHANNELS` against the target's width) and finds each channel group
(`blocks.channel_group`): the producing conv/linear and its BatchNorm, per-channel ops, depthwise convs, every
branch of a residual add, the slice of a concatenation. It drops those output channels from producers, those
entries from BatchNorms and depthwise convs, and those input channels from every conv/linear that reads the
group. The result equals the original with the channels zeroed at the consumers' inputs: exact where the group
is zero there (an always-off ReLU channel). Changes outputs by design (unverified, like `linearize`); a group
that reaches the graph output, an op that mixes channels, a grouped conv, or a token layout (N, T, C) that passes
through anything but linears, activations, dropout and adds is refused with a PlanError naming it.
"""
from functools import partial
from typing import Iterator

import torch
from torch import fx

from ..blocks import ChannelGroup, channel_group, validate_channels
from ..context import PassContext, Site
from ..errors import PlanError
from ..graph import add_constant, constant, names_of_kind, stable_name
from ..ops import bind, set_argument
from ..plan import PlanAction

_PRODUCER_PARAMS = ("weight", "bias", "running_mean", "running_var", "bias_map")


def _keep(size: int, removed: set[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([i for i in range(size) if i not in removed], dtype=torch.long, device=device)


def _slice(gm: fx.GraphModule, node: fx.Node, param: str, keep: torch.Tensor, dim: int) -> None:
    tensor = constant(gm, bind(node).args.get(param))
    if tensor is None:
        return
    hint = f"{stable_name(node)}_{param}".replace(":", "_")
    set_argument(node, param, add_constant(gm, hint, tensor.index_select(dim, keep), before=node))


def _remove_outputs(gm: fx.GraphModule, node: fx.Node, removed: set[int]) -> None:
    call = bind(node)
    weight = constant(gm, call["weight"] if call.kind != "batch_norm" else call["running_mean"])
    keep = _keep(weight.shape[0], removed, weight.device)
    for param in _PRODUCER_PARAMS:
        if param in call.args:
            _slice(gm, node, param, keep, 1 if param == "bias_map" else 0)
    if call.kind == "conv" and int(call["groups"]) > 1:
        set_argument(node, "groups", len(keep))


def _remove_inputs(gm: fx.GraphModule, node: fx.Node, removed: set[int]) -> None:
    weight = constant(gm, bind(node)["weight"])
    _slice(gm, node, "weight", _keep(weight.shape[1], removed, weight.device), 1)


def remove_channels(gm: fx.GraphModule, ctx: PassContext) -> Iterator[Site]:
    nodes = {stable_name(node): node for node in gm.graph.nodes}
    group = ChannelGroup()
    for decision in ctx.plan.decisions:
        if decision.action != "remove_channels":
            continue
        found = channel_group(gm, nodes[decision.target], decision.params["channels"])
        if not found:
            raise PlanError(f"cannot remove channels of {decision.target}: {found}")
        group.merge(found)
    for node, removed in group.producers.items():
        yield Site(stable_name(node), partial(_remove_outputs, gm, node, removed), exact=False,
                   detail=f"{len(removed)} output channels removed")
    for node, removed in group.consumers.items():
        yield Site(stable_name(node), partial(_remove_inputs, gm, node, removed), exact=False,
                   detail=f"{len(removed)} input channels removed")


REMOVE_CHANNELS = PlanAction("remove_channels", remove_channels, lambda gm: names_of_kind(gm, "activation", "add"),
                             validate_channels)
