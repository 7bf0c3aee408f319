"""zero_channels: make the channels a plan names output exactly zero, in the op that feeds the activation.

Reads the plan's `zero_channels` decisions (target: an activation; params: {"channels": [indices]}, checked by
`ZERO_CHANNELS` against the target's width). The activation's input must be a BatchNorm (its gamma and beta
are set to 0 on those channels) or a conv/linear (its weight rows and bias), used by nothing else. A ReLU-like
activation then outputs 0 there, linearised or not: this is how an always-off channel is handled where
`remove_channels` cannot remove it structurally (its channel group reaches ops that do not keep zeros, such as
a depthwise conv with bias). The weight shapes stay; later merges fold the zero rows. Changes outputs by
design (unverified).
"""
from functools import partial
from typing import Iterator

import torch
from torch import fx

from ..blocks import validate_channels
from ..context import PassContext, Site
from ..errors import PlanError
from ..graph import add_constant, constant, names_of_kind, real_users, stable_name
from ..ops import bind, set_argument
from ..plan import PlanAction


_ZEROED_PARAMS = {"batch_norm": ("weight", "bias"), "conv": ("weight", "bias"), "linear": ("weight", "bias")}


def _zeroed(gm: fx.GraphModule, target: str, call, channels: list[int]) -> dict[str, torch.Tensor]:
    """The params of `call` with `channels` zeroed, by name."""
    zeroed = {}
    for param in _ZEROED_PARAMS[call.kind]:
        if call[param] is None and (call.kind != "batch_norm" or param == "bias"):
            continue
        tensor = constant(gm, call[param])
        if tensor is None:
            raise PlanError(f"cannot zero channels of {target}: {stable_name(call.node)} has no constant {param}")
        zeroed[param] = tensor.detach().clone()
        zeroed[param][torch.tensor(channels, device=tensor.device)] = 0
    return zeroed


def _set_params(gm: fx.GraphModule, node: fx.Node, params: dict[str, torch.Tensor]) -> None:
    for param, tensor in params.items():
        hint = f"{stable_name(node)}_{param}".replace(":", "_")
        set_argument(node, param, add_constant(gm, hint, tensor, before=node))


def zero_channels(gm: fx.GraphModule, ctx: PassContext) -> Iterator[Site]:
    nodes = {stable_name(node): node for node in gm.graph.nodes}
    for decision in ctx.plan.decisions:
        if decision.action != "zero_channels":
            continue
        channels = decision.params["channels"]
        source = bind(nodes[decision.target])["input"]
        call = bind(source) if isinstance(source, fx.Node) else None
        if call is None or call.kind not in _ZEROED_PARAMS or len(real_users(call.output)) != 1:
            raise PlanError(f"cannot zero channels of {decision.target}: its input is not a BatchNorm, conv or "
                            "linear used only by it")
        yield Site(decision.target, partial(_set_params, gm, source, _zeroed(gm, decision.target, call, channels)),
                   (decision.target, stable_name(source)), exact=False, detail=f"{len(channels)} channels zeroed")


ZERO_CHANNELS = PlanAction("zero_channels", zero_channels, lambda gm: names_of_kind(gm, "activation"),
                           validate_channels)
