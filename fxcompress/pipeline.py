"""Run passes over a captured graph: plan first, then the exact passes to a fixed point, each verified.

Passes propose rewrites (`context.Site`s) and the pipeline applies them (`apply_pass`); the contract is in
`passes/README.md`. After every pass that changed the graph, its outputs on a seeded random variant of the
example inputs (`verify.random_sample`: one replay, which also annotates the shapes) are compared with those of
the graph before it. A pass whose sites all claim to be exact but moves the outputs by more than `config.tolerance`
(widened for float16 and bfloat16 graphs, `verify.tolerance_for`) is rolled back to the copy taken before
its first site; the faulty site is found by bisection over prefixes of the sites, excluded, and the pass run
again without it. Approximate rewrites and the plan's passes (which change outputs by design) are measured
and reported, not rolled back.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Container

import torch
from torch import fx
from torch.utils import _pytree as pytree

from .config import CompressConfig
from .context import PassContext, Site
from .cost import CostModel, LatencyTable
from .errors import PassError, PlanError
from .graph import Snapshot, annotate_names, annotate_shapes, names_of_kind, remove_unused_constants, stable_name
from .measure import op_timer
from .passes import EXACT_PASSES, PLAN_ACTIONS, fold_constants
from .plan import Plan
from .report import Check, Metrics, Report, Rewrite
from .verify import full_precision, output_tensors, outputs, random_sample, relative_error, tolerance_for

MAX_ROUNDS = 8


@dataclass
class _State:
    gm: fx.GraphModule
    reference: list  # outputs of `gm` on the samples


def activation_names(gm: fx.GraphModule) -> list[str]:
    return names_of_kind(gm, "activation")


def check_plan(gm: fx.GraphModule, plan: Plan) -> None:
    """Refuse, before any pass runs, a plan whose actions, targets or params do not fit `gm` (annotated with
    names and shapes), naming the decision at fault."""
    unknown = [decision.action for decision in plan.decisions if decision.action not in PLAN_ACTIONS]
    if unknown:
        raise PlanError(f"unknown plan action {unknown[0]!r}; valid: {', '.join(PLAN_ACTIONS)}")
    for action in PLAN_ACTIONS.values():
        _check_targets(plan, action.name, set(action.targets(gm)))
    repeated = Counter((decision.action, decision.target) for decision in plan.decisions)
    nodes = {stable_name(node): node for node in gm.graph.nodes}
    for decision in plan.decisions:
        if repeated[decision.action, decision.target] > 1:
            raise decision.error(f"the plan has {repeated[decision.action, decision.target]} decisions for it")
        PLAN_ACTIONS[decision.action].validate(decision, nodes[decision.target])


def _check_targets(plan: Plan, action: str, known: set[str]) -> None:
    missing = [target for target in plan.targets(action) if target not in known]
    if missing:
        hint = ", ".join(sorted(known)[:5]) or "none"
        origin = f" (plan made for {plan.model})" if plan.model else ""
        raise PlanError(f"plan names {len(missing)} {action} target(s) absent from this graph{origin}: "
                        f"{', '.join(missing[:5])}; valid targets here look like: {hint}")


def apply_pass(rewrite_pass: Callable, gm: fx.GraphModule, ctx: PassContext, *, excluded: Container[str] = (),
               limit: int | None = None, before_change: Callable[[], None] | None = None) -> list[Site]:
    """Apply, in order, the sites `rewrite_pass` yields on `gm` that are not `excluded`, at most `limit` of
    them, calling `before_change()` once before the first; then remove dead nodes and unused constants.
    Returns the sites applied."""
    applied: list[Site] = []
    try:
        for site in rewrite_pass(gm, ctx):
            if site.node in excluded:
                continue
            if limit is not None and len(applied) == limit:
                break
            if not applied and before_change is not None:
                before_change()
            site.apply()
            applied.append(site)
    except PlanError:
        raise
    except Exception as error:
        raise PassError(f"pass {rewrite_pass.__name__!r} failed: {error}") from error
    if applied:
        remove_unused_constants(gm)
        gm.graph.lint()
    return applied


def _rewrite(pass_name: str, site: Site) -> Rewrite:
    return Rewrite(pass_name, site.sources or (site.node,), site.exact, site.detail, *site.macs, *site.latency)


class Pipeline:
    def __init__(self, gm: fx.GraphModule, example_inputs, config: CompressConfig, plan: Plan,
                 exact_passes: tuple[Callable, ...] = EXACT_PASSES, first_outputs: list | None = None):
        """`first_outputs`: the outputs of `gm` on `verify.random_sample(example_inputs)` where the caller has
        already annotated its names and shapes on it (`compiler.compress_captured`), so that the graph is not
        replayed for them again."""
        self.config, self.plan, self.exact_passes = config, plan, exact_passes
        example_inputs = tuple(example_inputs)  # every replay runs on fresh copies (`verify.fresh`)
        self.flat_inputs = pytree.tree_leaves(example_inputs)
        device = next((str(t.device) for t in self.flat_inputs if isinstance(t, torch.Tensor)), "cpu")
        self.cost = CostModel(config.cost_model, LatencyTable(op_timer(config.latency_lowering, device),
                                                              f"{config.latency_lowering}|{device}")
                              if config.cost_model == "latency" else None)
        self.samples = [random_sample(example_inputs)]
        self.report = Report()
        self.excluded: dict[str, set[str]] = {}
        self.skips: list = []
        if first_outputs is None:
            annotate_names(gm)
            reference = self._replay(gm)
        else:
            reference = [first_outputs]
        check_plan(gm, plan)
        self.report.before = Metrics.of(gm)
        self.state = _State(gm, reference)
        self.tolerance = tolerance_for(config.tolerance, [self.state.reference, self.flat_inputs,
                                                          list(gm.state_dict().values())])

    def _replay(self, gm: fx.GraphModule) -> list:
        """The outputs of `gm` on the sample, annotating its shapes (the example's: the sample has its shapes)."""
        return [output_tensors(annotate_shapes(gm, self.samples[0]))]

    def run_pass(self, rewrite_pass: Callable, verify: bool = True) -> bool:
        """Apply one pass and measure the change of the outputs. With `verify`, a pass whose sites all claim
        to be exact and that moves the outputs by more than the tolerance is undone, its faulty site excluded,
        and the pass run again. The graph is copied only when the pass changes something."""
        name, gm = rewrite_pass.__name__, self.state.gm
        ctx = PassContext(self.config, name, plan=self.plan, cost=self.cost)
        excluded = self.excluded.setdefault(name, set())
        snapshots: list[Snapshot] = []
        applied = apply_pass(rewrite_pass, gm, ctx, excluded=excluded,
                             before_change=lambda: snapshots.append(Snapshot.of(gm)))
        if not applied:
            self.skips += ctx.skips
            return False
        result = self._replay(gm)
        error = relative_error(self.state.reference, result)
        if verify and all(site.exact for site in applied) and error > self.tolerance:
            culprit = applied[self._faulty_prefix(rewrite_pass, snapshots[0], len(applied)) - 1].node
            excluded.add(culprit)
            self.report.checks.append(Check(name, error, rolled_back=culprit))
            snapshots[0].restore(gm)
            remove_unused_constants(gm)
            return self.run_pass(rewrite_pass, verify)
        self.report.rewrites += [_rewrite(name, site) for site in applied]
        self.skips += ctx.skips
        self.report.checks.append(Check(name, error, verified=verify))
        self.state = _State(gm, result)
        return True

    def _faulty_prefix(self, rewrite_pass: Callable, original: Snapshot, count: int) -> int:
        """Length of the shortest prefix of the pass's sites that breaks the outputs: its last site is at fault
        (the pass yields the same sites in the same order on every copy of `original`)."""
        low, high = 1, count
        while low < high:
            middle = (low + high) // 2
            if self._prefix_breaks(rewrite_pass, original, middle):
                high = middle
            else:
                low = middle + 1
        return low

    def _prefix_breaks(self, rewrite_pass: Callable, original: Snapshot, limit: int) -> bool:
        gm = original.module()
        ctx = PassContext(self.config, rewrite_pass.__name__, plan=self.plan, cost=self.cost)
        apply_pass(rewrite_pass, gm, ctx, excluded=self.excluded[rewrite_pass.__name__], limit=limit)
        return relative_error(self.state.reference, outputs(gm, self.samples)) > self.tolerance

    def run(self) -> tuple[fx.GraphModule, Report]:
        if self.plan.decisions:
            self.run_pass(fold_constants)  # the plan passes read weights too (a pruned conv's, say)
        for action in PLAN_ACTIONS.values():
            if self.plan.targets(action.name):
                self.run_pass(action.apply, verify=False)
        for _ in range(MAX_ROUNDS):
            self.skips = []
            changed = [self.run_pass(rewrite_pass) for rewrite_pass in self.exact_passes]
            if not any(changed):
                break
        self.report.skips = self.skips  # reasons from the last round: why the final graph is as it is
        self.report.after = Metrics.of(self.state.gm)
        return self.state.gm, self.report


@full_precision()
def compress_graph(gm: fx.GraphModule, example_inputs, config: CompressConfig | None = None,
                   plan: Plan | None = None, exact_passes: tuple[Callable, ...] = EXACT_PASSES
                   ) -> tuple[fx.GraphModule, Report]:
    """Rewrite `gm` in place (callers pass a copy) and return it with the report."""
    return Pipeline(gm, example_inputs, config or CompressConfig(), plan or Plan(), exact_passes).run()
