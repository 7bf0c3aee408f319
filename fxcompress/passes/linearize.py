"""linearize: replace the activations a plan names by identity.

Reads the plan's `linearize` targets (stable node names) from the context; the pipeline has already
checked (`LINEARIZE`) that each names an activation of this graph and has no params. Changes outputs by
design, so it is verified against nothing: the linearised graph becomes the reference of the exact passes
that follow.
"""
from functools import partial
from typing import Iterator

from torch import fx

from ..context import PassContext, Site
from ..graph import names_of_kind, replace_node, stable_name
from ..ops import bind
from ..plan import PlanAction, takes_no_params


def linearize(gm: fx.GraphModule, ctx: PassContext) -> Iterator[Site]:
    targets = set(ctx.plan.targets("linearize"))
    for node in list(gm.graph.nodes):
        call = bind(node)
        if call is None or call.kind != "activation" or stable_name(node) not in targets:
            continue
        yield Site(stable_name(node), partial(replace_node, node, call["input"]),
                   detail=f"{call.name} -> identity")


LINEARIZE = PlanAction("linearize", linearize, lambda gm: names_of_kind(gm, "activation"), takes_no_params)
