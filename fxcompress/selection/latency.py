"""What a candidate saves, measured on the target lowering: the time of the part of the compiled graph it changes.

The exact model (the captured graph with the exact passes: BatchNorms folded, every merge the cost model
allows) and the model with one candidate applied differ only where the candidate acts: `changed_region`
finds the nodes of each that the other lacks (by stable name, op, output shape and weight shapes) and cuts
them out as stand-alone graphs over the same boundary inputs (`region_module`). Both are lowered like the
whole model and timed interleaved (`measure.measure_latency`); the saving is their difference. The table
keys a measurement by the two regions' structure (`signature`: ops, attributes, shapes, not weight values),
so the repeated blocks of a network are timed once; with a path it persists between runs. Timing regions
instead of whole models keeps the noise of a small saving apart from the time of the rest of the network;
what it misses (fusions and cache effects across a region's border) is why the selected plan is timed whole
afterwards.
"""
from __future__ import annotations

import hashlib
import operator
from pathlib import Path
from typing import Callable

import torch
from torch import fx

from ..backends import lower_module
from ..cost import MeasurementTable
from ..graph import constant, is_guard, stable_name, tensor_shape
from ..measure import measure_latency, torch_threads

Timer = Callable[[fx.GraphModule, tuple, fx.GraphModule, tuple], tuple[float, float]]  # (before ms, after ms)


def _node_key(gm: fx.GraphModule, node: fx.Node) -> tuple:
    weights = tuple(tuple(value.shape) for arg in node.all_input_nodes if (value := constant(gm, arg)) is not None)
    return stable_name(node), str(node.target), tuple(tensor_shape(node) or ()), weights


def _computing(gm: fx.GraphModule) -> list[fx.Node]:
    return [node for node in gm.graph.nodes if node.op in ("call_function", "call_method") and not is_guard(node)]


def changed_region(before: fx.GraphModule, after: fx.GraphModule) -> tuple[list[fx.Node], list[fx.Node]]:
    """The computing nodes of `before` that `after` lacks, and those of `after` that `before` lacks."""
    keys_before = {_node_key(before, node) for node in _computing(before)}
    keys_after = {_node_key(after, node) for node in _computing(after)}
    return ([node for node in _computing(before) if _node_key(before, node) not in keys_after],
            [node for node in _computing(after) if _node_key(after, node) not in keys_before])


def boundary_inputs(gm: fx.GraphModule, nodes: list[fx.Node]) -> list[fx.Node]:
    """The computed values (not constants) that `nodes` read from outside themselves, in graph order."""
    inside = set(nodes)
    found = {arg for node in nodes for arg in node.all_input_nodes if arg not in inside and arg.op != "get_attr"}
    return [node for node in gm.graph.nodes if node in found]


def region_module(gm: fx.GraphModule, nodes: list[fx.Node], inputs: list[fx.Node]) -> fx.GraphModule:
    """`nodes` of `gm` as a graph of their own: `inputs` (the region's boundary, in order) as placeholders,
    the constants they read copied in, and as outputs every value used outside the region; a region without
    nodes returns its first input (an identity, timed like the others)."""
    graph, env, constants = fx.Graph(), {}, {}
    for index, node in enumerate(inputs):
        env[node] = graph.placeholder(f"input_{index}")
    inside = set(nodes)
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and arg not in env:
                name = f"constant_{len(constants)}"
                constants[name] = operator.attrgetter(arg.target)(gm)
                env[arg] = graph.get_attr(name)
        env[node] = graph.node_copy(node, lambda arg: env[arg])
    outputs = [env[node] for node in nodes if any(user not in inside for user in node.users)]
    graph.output(tuple(outputs) if outputs else env[inputs[0]])
    root = torch.nn.Module()
    for name, value in constants.items():
        root.register_buffer(name, value.detach())
    return fx.GraphModule(root, graph).eval()


def signature(module: fx.GraphModule, inputs: tuple) -> str:
    """The structure of a region: its ops and their non-tensor arguments, the shapes and dtypes of its inputs
    and constants; two regions with the same signature take the same time."""
    index = {}
    lines = [f"input {tuple(t.shape)} {t.dtype}" for t in inputs]

    def describe(arg):
        if isinstance(arg, fx.Node):
            if arg.op == "get_attr":
                value = operator.attrgetter(arg.target)(module)
                return f"const{tuple(value.shape)}{value.dtype}"
            return f"%{index[arg]}"
        if isinstance(arg, (list, tuple)):
            return "[" + ",".join(map(describe, arg)) + "]"
        return repr(arg)

    for position, node in enumerate(module.graph.nodes):
        index[node] = position
        if node.op in ("call_function", "call_method", "output"):
            kwargs = ",".join(f"{key}={describe(value)}" for key, value in sorted(node.kwargs.items()))
            lines.append(f"{node.op} {node.target} {describe(list(node.args))} {kwargs}")
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()[:16]


def region_inputs(inputs: list[fx.Node], dtype: torch.dtype) -> tuple | None:
    """Seeded random tensors of the boundary's shapes; None where a boundary value has no tensor shape."""
    shapes = [tensor_shape(node) for node in inputs]
    if not shapes or any(shape is None for shape in shapes):
        return None
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(*shape, generator=generator, dtype=dtype) for shape in shapes)


def lowered_timer(lowering: str, device: str = "cpu", threads: int | None = None, repeats: int = 30,
                  warmup: int = 5) -> Timer:
    """Lower both regions with `lowering` and time them interleaved on `threads` CPU threads (None: torch's
    current number): (before ms, after ms), medians."""
    def time_regions(before: fx.GraphModule, before_inputs: tuple, after: fx.GraphModule, after_inputs: tuple
                     ) -> tuple[float, float]:
        runners = {}
        with torch_threads(threads):
            for name, module, inputs in (("before", before, before_inputs), ("after", after, after_inputs)):
                inputs = tuple(t.to(device) for t in inputs)
                runners[name] = _bound(lower_module(module.to(device), inputs, lowering), inputs)
            results = measure_latency(runners, (), warmup=warmup, repeats=repeats, device=torch.device(device).type)
        return results["before"]["median_ms"], results["after"]["median_ms"]
    return time_regions


def _bound(run: Callable, inputs: tuple) -> Callable[[], object]:
    return lambda: run(*inputs)


class LatencyTable(MeasurementTable):
    """Measured time of regions, keyed by their signatures (and the lowering, device and threads)."""

    def __init__(self, timer: Timer, key: str, path: str | Path | None = None):
        super().__init__(path)
        self.timer, self.key = timer, key

    def saving(self, before: fx.GraphModule, after: fx.GraphModule) -> float | None:
        """The ms saved where the region of `after` replaces that of `before` (negative: it costs more); 0 where
        they do not differ; None where a region's boundary cannot be fed."""
        removed, added = changed_region(before, after)
        if not removed and not added:
            return 0.0
        old_boundary, new_boundary = boundary_inputs(before, removed), boundary_inputs(after, added)
        old_boundary, new_boundary = old_boundary or new_boundary, new_boundary or old_boundary
        dtype = next((value.dtype for value in before.state_dict().values() if value.is_floating_point()),
                     torch.float32)
        old_inputs, new_inputs = region_inputs(old_boundary, dtype), region_inputs(new_boundary, dtype)
        if old_inputs is None or new_inputs is None:
            return None
        old, new = region_module(before, removed, old_boundary), region_module(after, added, new_boundary)
        key = f"{self.key}|{signature(old, old_inputs)}|{signature(new, new_inputs)}"
        before_ms, after_ms = self.measured(key, lambda: list(self.timer(old, old_inputs, new, new_inputs)))
        return before_ms - after_ms
