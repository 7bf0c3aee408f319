"""annotate_block_distance: LaCoOT's distance between each residual block's input and output.

For every residual add y = body(x) + shortcut(x) (`blocks.residual_block`) whose output has the shape
of x, replays the graph with an `fx.Interpreter` over `ctx.calibration` and writes under
`meta.BLOCK_DISTANCE` the mean over batches of the max-sliced Wasserstein distance between x and y, each
sample flattened (`criteria.block_distance`: POT, 50 projections, p = 2). A small distance marks a block
that can be replaced by its shortcut (`remove_block`). Blocks that change the shape (downsampling) are
skipped with the reason; a non-finite distance raises an OptionError naming the block. An analysis: only
annotates. For a differentiable regulariser during training call `criteria.block_distance` on the
tensors directly.
"""
import math

import torch
from torch import fx

from .. import meta
from ..blocks import residual_block
from ..context import PassContext
from ..criteria import block_distance
from ..errors import OptionError
from ..graph import graph_inputs, is_guard, stable_name, tensor_shape


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, blocks: dict):
        super().__init__(gm)
        self.blocks = blocks  # add node -> block input node
        self.inputs = set(blocks.values())
        self.kept: dict = {}
        self.distances: dict = {add: [] for add in blocks}

    def run_node(self, node: fx.Node):
        if is_guard(node):  # export's guards pin the example batch size; calibration batches may differ
            return None
        result = super().run_node(node)
        if node in self.inputs:  # kept here: the interpreter frees values after their last use
            self.kept[node] = result.detach().clone()
        if node in self.blocks:
            self.distances[node].append(float(block_distance(self.kept[self.blocks[node]], result)))
        return result


def _finite(node: fx.Node, distance: float) -> float:
    if not math.isfinite(distance):
        raise OptionError(f"calibration data gives a non-finite block distance at {stable_name(node)!r} "
                          f"({distance}); calibration batches must give finite values")
    return distance


def annotate_block_distance(gm: fx.GraphModule, ctx: PassContext) -> None:
    blocks = {}
    for node in gm.graph.nodes:
        block = residual_block(node)
        if not block:
            continue
        if tensor_shape(block[0]) != tensor_shape(node):
            ctx.skip(stable_name(node), "block changes the shape of its input")
            continue
        blocks[node] = block[0]
    if not blocks:
        return
    recorder = _Recorder(gm, blocks)
    with torch.no_grad():
        for inputs in ctx.calibration_inputs(len(graph_inputs(gm))):
            recorder.run(*inputs)
    for node, distances in recorder.distances.items():
        if distances:
            node.meta[meta.BLOCK_DISTANCE] = _finite(node, sum(distances) / len(distances))
