"""cleanup: drop inference no-ops: dropout in eval mode, dropout with p = 0.

Dead nodes and the constants only they used are removed by the pipeline after every pass; this pass
removes the ops that are identities at inference. Dropout in training mode is left alone.
"""
from functools import partial
from typing import Iterator

from torch import fx

from ..context import PassContext, Site
from ..graph import replace_node, stable_name
from ..ops import bind


def cleanup(gm: fx.GraphModule, ctx: PassContext) -> Iterator[Site]:
    for node in list(gm.graph.nodes):
        call = bind(node)
        if call is None or call.kind != "dropout":
            continue
        training = call.args.get("training", call.args.get("train"))
        if training and call["p"] != 0:
            ctx.skip(stable_name(node), "dropout in training mode")
            continue
        yield Site(stable_name(node), partial(replace_node, node, call["input"]),
                   detail="dropout -> identity")
