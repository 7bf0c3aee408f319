"""annotate_entropy: activation-state statistics of every activation on calibration data (EASIER, EGP).

Replays the graph with an `fx.Interpreter` over `ctx.calibration`, one batch at a time, and accumulates,
per channel of each activation's input z, how often z >= the lower end of its identity range
(`ops.activation_regions`: `min_val` for hardtanh, else 0, the sign of z) and the mean and std of z
(`criteria.ChannelStatistics`, memory O(channels)). Writes a `criteria.ActivationStats` under
`meta.ACTIVATION_STATS` on each activation node: p_on, per-channel and layer entropy (also the EGP variant
that ignores channels constant within a batch), mean and std.
The channel axis is 1 for (N, C, ...) and (N, F), the last one for token layouts (N, T, C) made by a
linear (`graph.channel_axis`). An analysis: only annotates. Does not track ReLU6's upper kink.
Calibration data that makes an activation's statistics non-finite (nan or inf) raises an OptionError naming
the activation: a nan is never counted as a state.
"""
import torch
from torch import fx

from .. import meta
from ..context import PassContext
from ..criteria import ActivationStats, ChannelStatistics
from ..errors import OptionError
from ..graph import channel_axis, graph_inputs, is_guard, stable_name
from ..ops import activation_regions, bind


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, watched: dict):
        super().__init__(gm)
        self.watched = watched  # activation node -> (its input node, channel axis, ChannelStatistics)

    def run_node(self, node: fx.Node):
        if is_guard(node):  # export's guards pin the example batch size; calibration batches may differ
            return None
        entry = self.watched.get(node)
        if entry is not None:  # read z before the node runs: in-place activations overwrite it
            source, axis, statistics = entry
            statistics.update(self.env[source], axis)
        return super().run_node(node)


def _finite(node: fx.Node, stats: ActivationStats) -> ActivationStats:
    if not (stats.mean.isfinite().all() and stats.std.isfinite().all()):
        raise OptionError(f"calibration data gives non-finite statistics at the input of activation "
                          f"{stable_name(node)!r} (nan or inf there); calibration batches must give finite values")
    return stats


def annotate_entropy(gm: fx.GraphModule, ctx: PassContext) -> None:
    watched = {}
    for node in gm.graph.nodes:
        call = bind(node)
        if call is None or call.kind != "activation" or not isinstance(call["input"], fx.Node):
            continue
        threshold = activation_regions(call).low
        watched[node] = (call["input"], channel_axis(call["input"]), ChannelStatistics(threshold))
    recorder = _Recorder(gm, watched)
    with torch.no_grad():
        for inputs in ctx.calibration_inputs(len(graph_inputs(gm))):
            recorder.run(*inputs)
    for node, (_, _, statistics) in watched.items():
        if statistics.samples:
            node.meta[meta.ACTIVATION_STATS] = _finite(node, statistics.result())
