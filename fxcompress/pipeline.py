"""Run passes over a captured graph: plan first, then the exact passes to a fixed point, each verified.

After every pass the graph's outputs are compared with those of the graph before it. A pass whose
rewrites all claim to be exact but moves the outputs by more than `config.tolerance` (widened for float16
and bfloat16 graphs, `verify.tolerance_for`) is rolled back; the faulty rewrite is found by re-running the
pass on a prefix of its rewrites, excluded, and the pass run again without it. Approximate rewrites are
measured and reported, not rolled back.
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass

from torch import fx
from torch.utils import _pytree as pytree

from .config import CompressConfig
from .context import PassContext
from .cost import CostModel, LatencyTable
from .errors import PassError, PlanError
from .graph import annotate_names, annotate_shapes, names_of_kind, remove_unused_constants, stable_name
from .passes import EXACT_PIPELINE, PASSES, PLAN_ACTIONS
from .plan import Plan
from .report import Check, Metrics, Report
from .verify import outputs, relative_error, sample_inputs, tolerance_for

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


def _apply(name: str, gm: fx.GraphModule, ctx: PassContext, inputs) -> bool:
    try:
        changed = PASSES[name](gm, ctx)
    except PlanError:
        raise
    except Exception as error:
        raise PassError(f"pass {name!r} failed: {error}") from error
    if changed:
        remove_unused_constants(gm)
        gm.graph.lint()
        annotate_shapes(gm, inputs)
    return changed


class Pipeline:
    def __init__(self, gm: fx.GraphModule, example_inputs, config: CompressConfig, plan: Plan):
        self.config, self.plan = config, plan
        self.cost = CostModel(config.cost_model, LatencyTable(config.latency_lowering)
                              if config.cost_model == "latency" else None)
        example_inputs = tuple(example_inputs)  # every replay runs on fresh copies (`verify.fresh`)
        self.flat_inputs = pytree.tree_leaves(example_inputs)
        self.samples = sample_inputs(example_inputs)
        self.report = Report()
        self.excluded: dict[str, set[str]] = {}
        self.skips: list = []
        annotate_names(gm)
        annotate_shapes(gm, self.flat_inputs)
        check_plan(gm, plan)
        self.report.before = Metrics.of(gm)
        self.state = _State(gm, outputs(gm, self.samples))
        self.tolerance = tolerance_for(config.tolerance, [self.state.reference, self.flat_inputs,
                                                          list(gm.state_dict().values())])

    def _context(self, name: str, limit: int | None = None) -> PassContext:
        return PassContext(self.config, name, plan=self.plan, cost=self.cost,
                           excluded=self.excluded.setdefault(name, set()), limit=limit)

    def run_pass(self, name: str, verify: bool = True) -> bool:
        original = copy.deepcopy(self.state.gm)
        ctx = self._context(name)
        gm = self.state.gm
        if not _apply(name, gm, ctx, self.flat_inputs):
            self.skips += ctx.skips
            return False
        result = outputs(gm, self.samples)
        error = relative_error(self.state.reference, result)
        exact = all(rewrite.exact for rewrite in ctx.rewrites)
        if verify and exact and error > self.tolerance:
            culprit = self._find_faulty_rewrite(name, original, len(ctx.rewrites))
            self.excluded[name].add(culprit)
            self.report.checks.append(Check(name, error, rolled_back=culprit))
            self.state.gm = original
            return self.run_pass(name, verify)
        self.report.rewrites += ctx.rewrites
        self.skips += ctx.skips
        self.report.checks.append(Check(name, error if verify else 0.0))
        self.state = _State(gm, result)
        return True

    def _find_faulty_rewrite(self, name: str, original: fx.GraphModule, count: int) -> str:
        """Smallest prefix of the pass's rewrites that breaks the outputs; its last rewrite is at fault."""
        low, high = 1, count
        while low < high:
            middle = (low + high) // 2
            if self._prefix_breaks(name, original, middle):
                high = middle
            else:
                low = middle + 1
        ctx = self._context(name, limit=low)
        _apply(name, copy.deepcopy(original), ctx, self.flat_inputs)
        return ctx.rewrites[-1].sources[-1]

    def _prefix_breaks(self, name: str, original: fx.GraphModule, limit: int) -> bool:
        gm = copy.deepcopy(original)
        _apply(name, gm, self._context(name, limit), self.flat_inputs)
        return relative_error(self.state.reference, outputs(gm, self.samples)) > self.tolerance

    def run(self) -> tuple[fx.GraphModule, Report]:
        if self.plan.decisions:
            self.run_pass("fold_constants")  # the plan passes read weights too (a pruned conv's, say)
        for action in PLAN_ACTIONS:
            if self.plan.targets(action):
                self.run_pass(action, verify=False)
        for _ in range(MAX_ROUNDS):
            self.skips = []
            changed = [self.run_pass(name) for name in EXACT_PIPELINE]
            if not any(changed):
                break
        self.report.skips = self.skips  # reasons from the last round: why the final graph is as it is
        self.report.after = Metrics.of(self.state.gm)
        return self.state.gm, self.report


def compress_graph(gm: fx.GraphModule, example_inputs, config: CompressConfig | None = None,
                   plan: Plan | None = None) -> tuple[fx.GraphModule, Report]:
    """Rewrite `gm` in place (callers pass a copy) and return it with the report."""
    return Pipeline(gm, example_inputs, config or CompressConfig(), plan or Plan()).run()
