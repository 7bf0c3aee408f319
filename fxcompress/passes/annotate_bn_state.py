"""annotate_bn_state: per-channel ON/OFF states of each activation from its BatchNorm (TLC), data-free.

A BatchNorm output channel is taken as N(beta, gamma^2), so for an activation that is the identity on
[low, high] (`ops.activation_regions`):
P(off) = Phi((low - beta) / |gamma|), P(saturated) = Phi((beta - high) / |gamma|), and the error of the
likeliest call is 1 - its probability (Phi(-|beta| / |gamma|) for ReLU). For an activation not fed by an
eval-mode BatchNorm with constant weights, the per-channel mean and std of its input measured by
`annotate_entropy` stand in for beta and |gamma|; without them the activation is skipped with the reason.
Writes a `criteria.ChannelStates` under `meta.CHANNEL_STATES`. An analysis: only annotates. The states
say where z lies, not what the activation outputs there: the planner decides from the regions whether an
off channel is 0 (removable), a constant, a slope or only approximately 0.
"""
import torch
from torch import fx

from .. import meta
from ..context import PassContext
from ..criteria import gaussian_states
from ..graph import constant, stable_name
from ..ops import activation_regions, bind


def _batch_norm_moments(gm: fx.GraphModule, node) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(beta, |gamma|) of the eval-mode BatchNorm producing `node`, or None."""
    bn = bind(node) if isinstance(node, fx.Node) else None
    if bn is None or bn.kind != "batch_norm" or bn["training"] is not False:
        return None
    beta = constant(gm, bn["bias"]) if bn["bias"] is not None else None
    gamma = constant(gm, bn["weight"]) if bn["weight"] is not None else None
    if beta is None or (bn["weight"] is not None and gamma is None):
        return None
    return beta.detach(), (torch.ones_like(beta) if gamma is None else gamma.detach().abs())


def annotate_bn_state(gm: fx.GraphModule, ctx: PassContext) -> None:
    for node in gm.graph.nodes:
        call = bind(node)
        if call is None or call.kind != "activation":
            continue
        regions = activation_regions(call)
        low, high = regions.low, regions.high
        moments = _batch_norm_moments(gm, call["input"])
        if moments is not None:
            node.meta[meta.CHANNEL_STATES] = gaussian_states(*moments, low, high, "batch_norm")
        elif meta.ACTIVATION_STATS in node.meta:
            stats = node.meta[meta.ACTIVATION_STATS]
            node.meta[meta.CHANNEL_STATES] = gaussian_states(stats.mean, stats.std, low, high, "calibration")
        else:
            ctx.skip(stable_name(node), "input is not a BatchNorm and no calibration statistics were recorded")
