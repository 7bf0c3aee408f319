"""The ahead-of-time entry point: `compress(model, example_inputs, ...)`."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from .capture import capture, check_inputs, is_planned
from .compiler import compress_captured
from .compressed import CompressedModule, compressed_module
from .config import CompressConfig
from .errors import CaptureError, OptionError
from .trainable import split_plan
from .graph import annotate_names, annotate_shapes
from .pipeline import activation_names as graph_activation_names
from .plan import Plan
from .planner import PLANNER_OPTIONS, check_max_error
from .report import Metrics, Report
from .tokens import TokenConfig, reduce_tokens


@dataclass
class CompressResult:
    module: CompressedModule  # the compressed model (an inference graph); call it like the original
    plan: Plan  # what was applied, reusable by the backend and the build step
    report: Report
    dynamic_batch: bool = False  # whether `module` takes any batch size (else only the example's)


def compress(model: torch.nn.Module, example_inputs, *, plan: Plan | str | dict | None = None,
             config: CompressConfig | None = None, tokens: TokenConfig | dict | None = None,
             criterion: str | None = None, calibration=None, max_error: float = 0.01, planner: dict | None = None,
             dynamic_batch: bool | None = None, **options) -> CompressResult:
    """Capture `model`, apply `plan` (its decisions: `passes.PLAN_ACTIONS`), then every exact merge the cost
    model allows.

    Options are the fields of `CompressConfig` (allow_approximate, force, allow_bias_map, max_kernel_size,
    tolerance, cost_model, latency_lowering).
    `tokens` (a `TokenConfig` or its fields as a dict) first reduces a ViT's tokens on a copy of the model
    (`reduce_tokens`), which is then captured. `criterion` ("bn", "entropy", "ot") finds the plan instead, on
    the captured graph that is compressed (`planner.plan_graph` with `calibration`, `max_error` and the
    `planner` keywords: the budget activations, macs_ratio or max_drop + evaluator, and aggregate); the plan
    found is returned. A model made by `apply_plan` is compressed as its original class with its plan
    followed by `plan`. `dynamic_batch=True` captures dim 0 of the inputs as symbolic, so that the result runs
    on any batch size (other dims stay fixed), or raises CaptureError where the model fixes its batch; False
    keeps the example's batch; None (the default) is dynamic where the model allows it, else static
    (`CompressResult.dynamic_batch` says which). The caller's model is never modified.
    """
    if dynamic_batch not in (None, True, False):
        raise OptionError(f"option 'dynamic_batch' must be True, False or None, got {dynamic_batch!r}")
    if config is not None and options:
        raise OptionError("pass either config or keyword options, not both")
    config = config or CompressConfig.from_options(options)
    plan = Plan.load(plan)
    if is_planned(model):
        if criterion is not None:
            raise OptionError("a model made by apply_plan is compressed with its own plan; find further decisions "
                              "on it with apply_plan before compressing, not with a criterion here")
        model, plan = split_plan(model, plan)
    example_inputs = check_inputs(model, example_inputs)
    check_max_error(max_error)
    planner_options = None
    if criterion is not None:
        if plan.decisions:
            raise OptionError("pass either plan or criterion, not both")
        unknown = sorted(set(planner or {}) - set(PLANNER_OPTIONS))
        if unknown:
            raise OptionError(f"unknown planner option(s) {', '.join(unknown)}; valid: {', '.join(PLANNER_OPTIONS)}")
        planner_options = {"calibration": calibration, "max_error": max_error, **(planner or {})}
    before = None
    if tokens is not None:
        before = _metrics(model, example_inputs)  # of the model as given: its tokens are reduced before capture
        model = reduce_tokens(model, tokens)
    with torch.no_grad():
        gm, dynamic_batch = _capture(model, example_inputs, dynamic_batch)
    gm, report, plan = compress_captured(gm, example_inputs, config, plan, criterion=criterion,
                                         planner=planner_options, model=type(model).__name__)
    report.before = before or report.before
    return CompressResult(compressed_module(gm), plan, report, dynamic_batch)


def _metrics(model: torch.nn.Module, example_inputs) -> Metrics:
    with torch.no_grad():
        gm = capture(model, example_inputs)
        annotate_shapes(gm, example_inputs)
    return Metrics.of(gm)


def _capture(model: torch.nn.Module, example_inputs, dynamic_batch: bool | None) -> tuple[fx.GraphModule, bool]:
    """The captured graph and whether its batch is dynamic: with None, dynamic unless the model fixes it."""
    if dynamic_batch is not None:
        return capture(model, example_inputs, dynamic_batch), dynamic_batch
    try:
        return capture(model, example_inputs, dynamic_batch=True), True
    except CaptureError:
        return capture(model, example_inputs), False


def activation_names(model: torch.nn.Module, example_inputs) -> list[str]:
    """Stable names of the model's activations in graph order: the targets a `linearize` plan takes."""
    with torch.no_grad():
        gm = capture(model, example_inputs)
    annotate_names(gm)
    return graph_activation_names(gm)
