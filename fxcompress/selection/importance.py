"""Free importances: the thesis's criteria mapped to the candidates, measured on calibration batches.

Each is 0 for a unit that is already what it would be replaced by, and about 1 for one in full use:
- linearize: the sum over its activations of the layer entropy of their ON/OFF states (EASIER; bits, the mean
  over channels: 0 for an activation whose channels never change state);
- remove_block: the block distance between the block's input and output relative to the input's distance from
  zero (LaCoOT's max-sliced Wasserstein distance, `criteria.block_distance`, mean over batches): 0 for a block
  whose output is its input;
- remove_channels: the expected fraction of the activation's channels misjudged off (TLC's BatchNorm states).
The three are not measured on one scale: the probe (`finetune.oneshot`) is, and is what the protocol uses.
`random_costs` gives seeded random importances: a random selection of the same latency, the baseline.
"""
from __future__ import annotations

import random

import torch
from torch import fx

from .. import meta
from ..config import CompressConfig
from ..context import Calibration, PassContext
from ..criteria import OFF, block_distance
from ..graph import graph_inputs, is_guard, stable_name
from ..passes import ANALYSES
from ..blocks import residual_block
from .table import CandidateTable


class _BlockRecorder(fx.Interpreter):
    """Relative block distance of the residual adds in `adds` over the batches it runs."""

    def __init__(self, gm: fx.GraphModule, adds: set[str]):
        super().__init__(gm)
        self.inputs = {}  # add node -> block input node
        for node in gm.graph.nodes:
            if stable_name(node) in adds and (block := residual_block(node)):
                self.inputs[node] = block[0]
        self.watched = set(self.inputs.values())
        self.kept, self.ratios = {}, {stable_name(add): [] for add in self.inputs}

    def run_node(self, node: fx.Node):
        if is_guard(node):
            return None
        result = super().run_node(node)
        if node in self.watched:
            self.kept[node] = result.detach().clone()
        if node in self.inputs:
            x = self.kept[self.inputs[node]]
            scale = float(block_distance(x, torch.zeros_like(x)))
            self.ratios[stable_name(node)].append(float(block_distance(x, result)) / scale if scale else 0.0)
        return result


def criterion_costs(gm: fx.GraphModule, table: CandidateTable, calibration: list) -> dict[str, float]:
    """The criterion importance (module docstring) of every usable candidate of `table`, by name; `gm` is the
    graph the table was built on."""
    calibration = Calibration(calibration)
    for name in ("annotate_entropy", "annotate_bn_state"):
        ANALYSES[name](gm, PassContext(CompressConfig(), name, calibration=calibration))
    nodes = {stable_name(node): node for node in gm.graph.nodes}
    entries = [entry for entry in table.entries if entry.usable]
    adds = {add for entry in entries for add in entry.candidate.blocks}
    recorder = _BlockRecorder(gm, adds)
    if adds:
        with torch.no_grad():
            for batch in calibration.inputs(len(graph_inputs(gm)), "block distances", "calibration: block distances"):
                recorder.run(*batch)
    costs = {}
    for entry in entries:
        candidate = entry.candidate
        if candidate.kind == "linearize":
            costs[candidate.name] = sum(nodes[name].meta[meta.ACTIVATION_STATS].layer_entropy
                                        for name in candidate.activations)
        elif candidate.kind == "remove_block":
            costs[candidate.name] = sum(sum(recorder.ratios[add]) / len(recorder.ratios[add])
                                        for add in candidate.blocks) / len(candidate.blocks)
        else:
            (name,) = candidate.activations
            states = nodes[name].meta[meta.CHANNEL_STATES]
            off = torch.tensor([label == OFF for label in states.states()], device=states.error.device)
            costs[candidate.name] = float(states.error[off].sum()) / len(off)
    return costs


def random_costs(table: CandidateTable, seed: int) -> dict[str, float]:
    """A seeded random importance in [0, 1) for every usable candidate."""
    generator = random.Random(seed)
    return {entry.candidate.name: generator.random() for entry in table.entries if entry.usable}
