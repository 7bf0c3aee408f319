"""merge_tokens: reduce a ViT's tokens after the encoder layers a plan names (FOLDER on a captured graph).

Each `merge_tokens` decision targets the output node of an encoder layer (its last residual add) with
params {method, tokens, protected, restore_order}. The pass inserts `token_merge.reduce_step` there and
routes the layer's users to the reduced tokens; sizes and positions flow from one reduction to the next,
so size-weighted averages stay exact across layers. Matching uses the layer's output features, since the
attention's keys are inside an opaque op. Needs names (`annotate_names`); `tokens.graph.token_plan`
makes the decisions and refuses sites downstream of which the token count is baked into the graph.
Changes outputs by design (a plan pass).
"""
from __future__ import annotations

import operator

from torch import fx

from ..context import PassContext
from ..graph import stable_name
from ..token_merge import reduce_step


def merge_tokens(gm: fx.GraphModule, ctx: PassContext) -> bool:
    decisions = {d.target: d.params for d in ctx.plan.decisions if d.action == "merge_tokens"}
    size = position = None
    changed = False
    for node in list(gm.graph.nodes):
        params = decisions.get(stable_name(node))
        if params is None or not ctx.allows(stable_name(node)):
            continue
        users = list(node.users)
        with gm.graph.inserting_after(node):
            step = gm.graph.call_function(reduce_step, (node, size, position), {
                "method": params["method"], "target": params["tokens"], "protected": params["protected"],
                "restore": params["restore_order"]})
        with gm.graph.inserting_after(step):
            tokens = gm.graph.call_function(operator.getitem, (step, 0))
            size = gm.graph.call_function(operator.getitem, (step, 1))
            position = gm.graph.call_function(operator.getitem, (step, 2))
        for user in users:
            user.replace_input_with(node, tokens)
        ctx.record([stable_name(node)], exact=False, detail=f"{params['method']}: {params['tokens']} tokens left")
        changed = True
    return changed
