"""merge_conv_chain: merge chains of convolutions with nothing non-linear between them into fewer convs.

Kernel K = k1 + (k2 - 1) * s1, stride s1 * s2, padding p1 + p2 * s1 (`merge_math.compose_conv`). A merge
is exact when the second conv has no padding, or when the first kernel is 1x1 (the border is then fixed
by an input-independent bias map for the captured resolution); otherwise it is approximate on the border
ring and applied only with `allow_approximate`. `chains.segment_chain` picks the segments: cheapest in
cost (MACs or measured latency, see `cost.py`) with no more parameters, or fewest convs with `force`.
Reads `meta.SHAPE` (spatial sizes). Does not merge across a fan-out, a pooling or any op missing from the
op table; dilated convs (refused with a reason: the composition is for dilation 1) and transposed convs stay.
"""
from functools import partial
from typing import Iterator

from torch import fx

from ..chains import segment_chain
from ..context import PassContext, Site
from ..cost import merge_costs
from ..graph import stable_name, tensor_shape
from ..layers import find_chains, read_conv, replace_chain, spatial_size
from ..merge_math import ConvSpec, compose_conv


def merge_conv_chain(gm: fx.GraphModule, ctx: PassContext) -> Iterator[Site]:
    config = ctx.config
    for chain in find_chains(gm, "conv", read_conv):
        nodes = [call.node for call, _ in chain]
        sizes = [spatial_size(node) for node in nodes]
        in_shapes = [tensor_shape(call["input"]) for call, _ in chain]
        refusals: dict[int, str] = {}

        def compose(merged: ConvSpec, spec: ConvSpec, j: int):
            if merged.is_dilated or spec.is_dilated:
                refusals[j] = "a dilated convolution (merging needs dilation 1)"
                return None
            result, exact = compose_conv(merged, spec, sizes[j - 1])
            if max(result.kernel_size) > config.max_kernel_size:
                refusals[j] = f"merged kernel {result.kernel_size} exceeds max_kernel_size"
                return None
            if result.bias_map is not None and not config.allow_bias_map:
                refusals[j] = "merge needs a bias map for one resolution (allow_bias_map is off)"
                return None
            if not exact and not config.allow_approximate:
                refusals[j] = "merge would be approximate on the border ring (allow_approximate is off)"
                return None
            return result, exact

        def cost(spec: ConvSpec, start: int, end: int):
            return ctx.cost.conv(spec, in_shapes[start], sizes[end])

        specs = [spec for _, spec in chain]
        segments = segment_chain(specs, compose, cost, config.force, costlier := {})
        refusals.update({j: reason for j, reason in costlier.items() if any(seg.start == j for seg in segments)})
        for segment in segments:
            members = nodes[segment.start:segment.stop]
            if len(members) < 2:
                continue
            first, last = segment.start, segment.stop - 1
            parts = [(specs[i], in_shapes[i], sizes[i]) for i in range(first, last + 1)]
            yield Site(stable_name(members[-1]), partial(replace_chain, gm, members, segment.spec),
                       tuple(map(stable_name, members)), segment.exact,
                       f"kernel {segment.spec.kernel_size} stride {segment.spec.stride}"
                       + ("" if segment.exact else ", border ring approximate"),
                       **merge_costs(ctx.cost, "conv", parts, (segment.spec, in_shapes[first], sizes[last])))
        for j, reason in refusals.items():
            ctx.skip(stable_name(nodes[j]), f"not merged with its producer: {reason}")
