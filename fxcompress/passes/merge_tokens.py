"""merge_tokens: reduce a ViT's tokens after the encoder layers a plan names (FOLDER on a captured graph).

Each `merge_tokens` decision targets the output node of an encoder layer (its last residual add) with
params {method, tokens, protected, restore_order} (`token_merge.reduce_step`'s method, target, protected and
restore), checked by `MERGE_TOKENS` against the target's token count. The pass inserts `reduce_step` there and
routes the layer's users to the reduced tokens; sizes and positions flow from one reduction to the next,
so size-weighted averages stay exact across layers. Folder and tome match on the head-averaged keys of the
layer's attention (`tokens.graph.attention_of`), as `reduce_tokens` does; a layer whose keys cannot be read
is refused. Needs names (`annotate_names`); `tokens.graph.token_plan` makes the decisions, with the graph's
prefix tokens as `protected`, and refuses sites downstream of which the token count is baked into the graph.
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
from ..token_merge import MATCHING, reduce_step
from ..tokens.config import METHODS
from ..tokens.graph import attention_of, emit_keys, layer_output_names

_PARAMS = ("method", "tokens", "protected", "restore_order")


def _insert_reduction(gm: fx.GraphModule, node: fx.Node, params: dict, carried: list) -> None:
    """Insert `reduce_step` after `node`, fed the sizes and positions in `carried` (from the previous
    reduction, or None twice) and, for a matching method, the keys of the layer's attention; route `node`'s
    users to the reduced tokens and carry the new sizes and positions."""
    users = list(node.users)
    keys = emit_keys(gm, attention_of(node)) if params["method"] in MATCHING else None
    with gm.graph.inserting_after(node):
        step = gm.graph.call_function(reduce_step, (node, *carried, keys), {
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
    if method in MATCHING and attention_of(node) is None:
        raise decision.error(f"{method} matches on the keys of an encoder layer's attention, and the target is not "
                             "the output of a layer whose keys can be read (scaled_dot_product_attention or "
                             "multi_head_attention_forward)")


MERGE_TOKENS = PlanAction("merge_tokens", merge_tokens, layer_output_names, _validate)
