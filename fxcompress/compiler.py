"""From a captured graph to a compressed graph: the one path that `compress` and the `depthprune` backend share.

A graph comes in from `capture.capture` (torch.export) or from dynamo with its weights baked
(`capture.bake_weights`). The decisions asked for are found on this graph, the one that is compressed: the
plan of a criterion (`planner.plan_graph`) and the token reductions of a `TokenConfig`
(`tokens.graph.token_plan`). They join the given plan, and the pipeline applies the plan and then the exact
passes, each verified (`pipeline.Pipeline`).
"""
from __future__ import annotations

import torch
from torch import fx

from .config import CompressConfig
from .graph import annotate_names, annotate_shapes
from .pipeline import Pipeline
from .plan import Plan
from .planner import plan_graph
from .report import Report
from .tokens.config import TokenConfig
from .tokens.graph import token_plan
from .verify import full_precision, output_tensors, random_sample


@full_precision()
def compress_captured(gm: fx.GraphModule, example_inputs, config: CompressConfig, plan: Plan, *,
                      tokens: TokenConfig | None = None, criterion: str | None = None, planner: dict | None = None,
                      model: str = "") -> tuple[fx.GraphModule, Report, Plan]:
    """Compress `gm` in place (callers pass a copy) with `plan` plus the decisions found on it: token
    reductions for `tokens`, and the plan of `criterion` with the `planner.plan_graph` keywords in `planner`
    (calibration, max_error, budgets), in full float32 precision. Returns the graph, its report and the plan
    applied."""
    decisions, first_outputs = list(plan.decisions), None
    tokens = None if tokens is None or tokens.is_identity else tokens
    finds = tokens is not None or criterion is not None
    if finds:  # the pipeline then reuses these annotations and outputs
        annotate_names(gm)
        first_outputs = output_tensors(annotate_shapes(gm, random_sample(example_inputs)))
    if tokens is not None:
        decisions += token_plan(gm, tokens).decisions
    if criterion is not None:
        decisions += plan_graph(gm, example_inputs, criterion=criterion, config=config, model=model,
                                **(planner or {})).plan.decisions
    applied = Plan(tuple(decisions), plan.model or (model if finds else ""))
    with torch.no_grad():
        gm, report = Pipeline(gm, example_inputs, config, applied, first_outputs=first_outputs).run()
    return gm, report, applied
