"""zero_channels: make the channels a plan names output exactly zero, in the op that feeds the activation.

Reads the plan's `zero_channels` decisions (target: an activation; params: {"channels": [indices]}, checked by
`ZERO_CHANNELS` against the target's width). The activation's input must be a BatchNorm (its gamma and beta
are set to 0 on those channels) or a conv/linear (its weight rows and bias), used by nothing else. A ReLU-like
activation then outputs 0 there, linearised or not: this is how an always-off channel is handled where
`remove_channels` cannot remove it structurally (its channel group reaches ops that do not keep zeros, such as
a depthwise conv with bias). The weight shapes stay; later merges fold the zero rows. Changes outputs by
design (unverified).
"""
import torch
from torch import fx

from ..blocks import validate_channels
from ..context import PassContext
from ..errors import PlanError
from ..graph import add_constant, constant, names_of_kind, real_users, stable_name
from ..ops import bind, set_argument
from ..plan import PlanAction


def zero_channels(gm: fx.GraphModule, ctx: PassContext) -> bool:
    nodes = {stable_name(node): node for node in gm.graph.nodes}
    changed = False
    for decision in ctx.plan.decisions:
        if decision.action != "zero_channels":
            continue
        channels = decision.params["channels"]
        source = bind(nodes[decision.target])["input"]
        call = bind(source) if isinstance(source, fx.Node) else None
        params = {"batch_norm": ("weight", "bias"), "conv": ("weight", "bias"), "linear": ("weight", "bias")}
        if call is None or call.kind not in params or len(real_users(call.output)) != 1:
            raise PlanError(f"cannot zero channels of {decision.target}: its input is not a BatchNorm, conv or "
                            "linear used only by it")
        for param in params[call.kind]:
            if call[param] is None and (call.kind != "batch_norm" or param == "bias"):
                continue
            tensor = constant(gm, call[param])
            if tensor is None:
                raise PlanError(f"cannot zero channels of {decision.target}: {stable_name(source)} has no "
                                f"constant {param}")
            zeroed = tensor.detach().clone()
            zeroed[torch.tensor(channels)] = 0
            hint = f"{stable_name(source)}_{param}".replace(":", "_")
            set_argument(source, param, add_constant(gm, hint, zeroed, before=source))
        ctx.record([decision.target, stable_name(source)], False, f"{len(channels)} channels zeroed")
        changed = True
    return changed


ZERO_CHANNELS = PlanAction("zero_channels", zero_channels, lambda gm: names_of_kind(gm, "activation"),
                           validate_channels)
