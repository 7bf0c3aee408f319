"""Lowerings: turn a graph or module into what runs. Each has two entries: `graph` for a flat FX graph
handed over by dynamo (inside the depthprune backend), `module` for a whole model (CLI, benchmarks)."""
from ..errors import valid_choice
from . import eager, inductor

LOWERINGS = {"eager": eager, "inductor": inductor}


def lower_graph(gm, example_inputs, lowering: str):
    valid_choice("lowering", lowering, LOWERINGS)
    return LOWERINGS[lowering].graph(gm, example_inputs)


def lower_module(module, lowering: str):
    valid_choice("lowering", lowering, LOWERINGS)
    return LOWERINGS[lowering].module(module)
