"""merge_tokens: reduce a ViT's tokens after the encoder layers a plan names (FOLDER on a captured graph).

Each `merge_tokens` decision targets the output node of an encoder layer (its last residual add) with
params {method, tokens, protected, restore_order} (`token_merge.reduce_step`'s method, target, protected and
restore), checked by `MERGE_TOKENS` against the target's token count. The pass inserts `reduce_step` there and
routes the layer's users to the reduced tokens; sizes and positions flow from one reduction to the next,
so size-weighted averages stay exact across layers. Matching uses the layer's output features, since the
attention's keys are inside an opaque op. Needs names (`annotate_names`); `tokens.graph.token_plan`
makes the decisions and refuses sites downstream of which the token count is baked into the graph.
Changes outputs by design (a plan pass).
"""
from __future__ import annotations

import operator
from functools import partial
from typing import Iterator

from torch import fx

from ..context import PassContext, Site
from ..graph import stable_name, tensor_shape
from ..plan import Decision, PlanAction, check_param_names, is_int
from ..token_merge import reduce_step
from ..tokens.config import METHODS
from ..tokens.graph import layer_output_names

_PARAMS = ("method", "tokens", "protected", "restore_order")


def _insert_reduction(gm: fx.GraphModule, node: fx.Node, params: dict, carried: list) -> None:
    """Insert `reduce_step` after `node`, fed the sizes and positions in `carried` (from the previous
    reduction, or None twice), route `node`'s users to the reduced tokens and carry the new ones."""
    users = list(node.users)
    with gm.graph.inserting_after(node):
        step = gm.graph.call_function(reduce_step, (node, *carried), {
            "method": params["method"], "target": params["tokens"], "protected": params["protected"],
            "restore": params["restore_order"]})
    with gm.graph.inserting_after(step):
        tokens = gm.graph.call_function(operator.getitem, (step, 0))
        carried[:] = [gm.graph.call_function(operator.getitem, (step, index)) for index in (1, 2)]
    for user in users:
        user.replace_input_with(node, tokens)


def merge_tokens(gm: fx.GraphModule, ctx: PassContext) -> Iterator[Site]:
    decisions = {d.target: d.params for d in ctx.plan.decisions if d.action == "merge_tokens"}
    carried = [None, None]  # sizes and positions flowing from one reduction to the next
    for node in list(gm.graph.nodes):
        params = decisions.get(stable_name(node))
        if params is not None:
            yield Site(stable_name(node), partial(_insert_reduction, gm, node, params, carried), exact=False,
                       detail=f"{params['method']}: {params['tokens']} tokens left")


def _validate(decision: Decision, node: fx.Node) -> None:
    check_param_names(decision, _PARAMS)
    method, tokens, protected, restore = (decision.params[name] for name in _PARAMS)
    if method not in METHODS:
        raise decision.error(f"'method' must be one of {', '.join(METHODS)}, got {method!r}")
    if not is_int(protected) or protected < 0:
        raise decision.error(f"'protected' must be an int >= 0, got {protected!r}")
    shape = tensor_shape(node)
    if shape is None or len(shape) != 3:
        raise decision.error("the target is not a [batch, tokens, channels] tensor")
    count = shape[1]
    if not is_int(tokens) or not protected < tokens <= count:
        raise decision.error(f"'tokens' must be an int in {protected + 1}..{count} (more than the {protected} "
                             f"protected, at most the {count} tokens there), got {tokens!r}")
    if not isinstance(restore, bool):
        raise decision.error(f"'restore_order' must be a bool, got {restore!r}")


MERGE_TOKENS = PlanAction("merge_tokens", merge_tokens, layer_output_names, _validate)
