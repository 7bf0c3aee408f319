"""merge_linear_chain: merge chains of linear layers with nothing non-linear between them.

W = W2 W1, b = W2 b1 + b2 (`merge_math.compose_linear`), always exact. A transformer MLP d -> 4d -> d
whose GELU was linearised becomes one d -> d linear (8x fewer MACs). Segments are chosen by
`chains.segment_chain` (cheapest, or fewest with `force`); a bottleneck d -> r -> d with small r stays.
Reads `meta.SHAPE`. Does not merge across a fan-out or any op missing from the op table.
"""
from functools import partial
from typing import Iterator

from torch import fx

from ..chains import segment_chain
from ..context import PassContext, Site
from ..cost import merge_costs
from ..graph import stable_name, tensor_shape
from ..layers import find_chains, read_linear, replace_chain
from ..merge_math import LinearSpec, compose_linear


def merge_linear_chain(gm: fx.GraphModule, ctx: PassContext) -> Iterator[Site]:
    for chain in find_chains(gm, "linear", read_linear):
        nodes = [call.node for call, _ in chain]
        in_shapes = [tensor_shape(call["input"]) for call, _ in chain]

        def compose(merged: LinearSpec, spec: LinearSpec, j: int):
            return LinearSpec(*compose_linear(merged.weight, merged.bias, spec.weight, spec.bias)), True

        def cost(spec: LinearSpec, start: int, end: int):
            return ctx.cost.linear(spec, in_shapes[start])

        specs = [spec for _, spec in chain]
        segments = segment_chain(specs, compose, cost, ctx.config.force, costlier := {})
        for j, reason in costlier.items():
            if any(segment.start == j for segment in segments):
                ctx.skip(stable_name(nodes[j]), f"not merged with its producer: {reason}")
        for segment in segments:
            members = nodes[segment.start:segment.stop]
            if len(members) < 2:
                continue
            parts = [(specs[i], in_shapes[i]) for i in range(segment.start, segment.stop)]
            yield Site(stable_name(members[-1]), partial(replace_chain, gm, members, segment.spec),
                       tuple(map(stable_name, members)),
                       detail=f"{segment.spec.weight.shape[1]} -> {segment.spec.weight.shape[0]}",
                       **merge_costs(ctx.cost, "linear", parts, (segment.spec, in_shapes[segment.start])))
