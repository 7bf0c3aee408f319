"""One-shot selection: every candidate unit measured on the target, then the best compatible set at once.

`candidates` finds the units (activation runs to linearise, residual blocks, off channels), `table` measures
what each saves on the target lowering (`latency`: regions timed once per signature), `importance` gives the
criteria's costs (the probe, which fine-tunes, is on the training side: `finetune.oneshot`) and `knapsack`
solves the selection exactly. `select` joins a table and costs into a plan.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import OptionError
from ..plan import Plan
from .knapsack import Item, reaching_saving, within_cost
from .table import CandidateTable, Entry


@dataclass(frozen=True)
class SelectionResult:
    plan: Plan
    chosen: tuple[Entry, ...]
    saving_ms: float  # predicted: the chosen candidates' savings added up
    cost: float
    base_ms: float  # the whole dense model's latency on the table's lowering
    reached: bool  # whether the target was reached (a latency target can be out of the table's reach)

    @property
    def predicted_ratio(self) -> float:
        return (self.base_ms - self.saving_ms) / self.base_ms

    def to_dict(self) -> dict:
        return {"chosen": [entry.candidate.name for entry in self.chosen], "plan": self.plan.to_dict(),
                "saving_ms": self.saving_ms, "cost": self.cost, "base_ms": self.base_ms,
                "predicted_ratio": self.predicted_ratio, "reached": self.reached}


def select(table: CandidateTable, costs: dict[str, float], base_ms: float, *, latency_ratio: float | None = None,
           budget: float | None = None, min_saving: float = 0.0) -> SelectionResult:
    """The compatible candidates of `table` that lose the least summed cost (`costs`: by candidate name, >= 0;
    candidates without one are left out) while the predicted latency reaches `latency_ratio` of `base_ms`, or
    that save the most within a summed cost of `budget`: exactly one of the two. Candidates saving less than
    `min_saving` ms are left out. Where no selection reaches the ratio, the one saving the most is taken
    (`reached` False)."""
    if (latency_ratio is None) == (budget is None):
        raise OptionError("select needs exactly one of latency_ratio and budget")
    indices = [i for i, entry in enumerate(table.entries)
               if entry.usable and entry.saving_ms > max(min_saving, 0.0) and entry.candidate.name in costs]
    position = {index: k for k, index in enumerate(indices)}
    items = [Item(table.entries[i].candidate.name, table.entries[i].saving_ms,
                  max(0.0, costs[table.entries[i].candidate.name])) for i in indices]
    conflicts = {frozenset(position[i] for i in pair) for pair in table.conflicts if pair <= position.keys()}
    reached = True
    if budget is not None:
        chosen = within_cost(items, conflicts, budget)
    else:
        chosen = reaching_saving(items, conflicts, (1 - latency_ratio) * base_ms)
        if chosen is None:
            chosen, reached = within_cost(items, conflicts, float("inf")), False
    entries = tuple(entry for entry in table.entries if entry.candidate.name in set(chosen.names))
    plan = Plan(tuple(decision for entry in entries for decision in entry.candidate.decisions))
    return SelectionResult(plan, entries, chosen.saving, chosen.cost, base_ms, reached)
