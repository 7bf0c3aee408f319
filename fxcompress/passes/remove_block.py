"""remove_block: replace the residual blocks a plan names by their shortcuts (LaCoOT's block removal).

Reads the plan's `remove_block` targets (stable names of residual adds, no params: `REMOVE_BLOCK`).
`blocks.residual_block` splits y = body(x) + shortcut(x); the add's users then read shortcut(x) (x itself for
an identity shortcut) and the body is erased. Changes outputs by design (unverified, like `linearize`): exact
only where the body's output is zero. The body is erased explicitly, since FX's dead-code elimination keeps
in-place ops. An add that is not a residual block is refused with a PlanError giving the reason.
"""
from functools import partial
from typing import Iterator

from torch import fx

from ..blocks import residual_block
from ..context import PassContext, Site
from ..errors import PlanError
from ..graph import names_of_kind, replace_node, stable_name
from ..plan import PlanAction, takes_no_params


def _erase_dead(gm: fx.GraphModule, node: fx.Node) -> None:
    """Erase `node` and its producers once unused; dead-code elimination keeps in-place ops (relu_)."""
    work, erased = [node], set()
    while work:
        current = work.pop()
        if current in erased or current.users or current.op in ("placeholder", "output"):
            continue
        work += current.all_input_nodes
        gm.graph.erase_node(current)
        erased.add(current)


def _replace_by_shortcut(gm: fx.GraphModule, add: fx.Node, shortcut: fx.Node, body: fx.Node) -> None:
    replace_node(add, shortcut)
    _erase_dead(gm, body)


def remove_block(gm: fx.GraphModule, ctx: PassContext) -> Iterator[Site]:
    targets = set(ctx.plan.targets("remove_block"))
    for node in list(gm.graph.nodes):
        name = stable_name(node)
        if name not in targets:
            continue
        block = residual_block(node)
        if not block:
            raise PlanError(f"cannot remove block {name}: {block}")
        _, shortcut, body = block
        yield Site(name, partial(_replace_by_shortcut, gm, node, shortcut, body), (name, stable_name(body)),
                   exact=False, detail="block replaced by its shortcut")


REMOVE_BLOCK = PlanAction("remove_block", remove_block, lambda gm: names_of_kind(gm, "add"), takes_no_params)
