"""linearize: replace the activations a plan names by identity.

Reads the plan's `linearize` targets (stable node names) from the context; the pipeline has already
checked that each names an activation of this graph. Changes outputs by design, so it is verified
against nothing: the linearised graph becomes the reference of the exact passes that follow.
"""
from torch import fx

from ..context import PassContext
from ..graph import replace_node, stable_name
from ..ops import bind


def linearize(gm: fx.GraphModule, ctx: PassContext) -> bool:
    targets = set(ctx.plan.targets("linearize"))
    changed = False
    for node in list(gm.graph.nodes):
        call = bind(node)
        if call is None or call.kind != "activation" or stable_name(node) not in targets:
            continue
        replace_node(node, call["input"])
        ctx.record([stable_name(node)], detail=f"{call.name} -> identity")
        changed = True
    return changed
