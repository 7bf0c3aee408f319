"""Joint selection over a candidate table: which compatible candidates to take together.

Each candidate saves `saving` (measured latency) and costs `cost` (an importance: the accuracy or loss it is
expected to lose); some pairs exclude each other (they share an activation, or taking both would unlock a
merge that neither has alone: that merge is a candidate of its own). Savings and costs of compatible
candidates add up; the table is built so that this holds (`selection.candidates`).

The problem is a knapsack with conflicts. It is solved exactly by splitting the conflict graph into its
connected components (a block's candidates, or a chain's), enumerating each component's options (its sets of
pairwise compatible candidates: a handful per component), and combining the components by dynamic programming
over Pareto frontiers of (cost, saving): after each component the frontier holds, for every reachable total
cost, the largest total saving, and nothing else. Any selection is one option per component, and an option
that is dominated (costlier and saving no more) can never be part of an optimum, so the final frontier
contains the optimum of both questions asked here: the largest saving within a cost budget (`within_cost`),
and the smallest cost reaching a saving (`reaching_saving`). No value is rounded. The frontier has at most one
point per distinct total cost; with the tables built here (tens of components of a few options) it stays at a
few thousand points and the solve takes well under a second.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from ..errors import OptionError

MAX_COMPONENT = 16  # candidates in one conflict component: its options are enumerated (2**16 subsets at most)


@dataclass(frozen=True)
class Item:
    name: str
    saving: float  # what taking it saves (ms), compatible items adding up
    cost: float  # what taking it loses (importance), >= 0


@dataclass(frozen=True)
class Selection:
    names: tuple[str, ...]  # in table order
    saving: float
    cost: float


def conflict_components(count: int, conflicts: set[frozenset[int]]) -> list[list[int]]:
    """The connected components of the conflict graph on items 0..count-1, each sorted, in order of their
    first item."""
    parent = list(range(count))

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    for pair in conflicts:
        a, b = sorted(pair)
        parent[root(b)] = root(a)
    groups: dict[int, list[int]] = {}
    for index in range(count):
        groups.setdefault(root(index), []).append(index)
    return sorted(groups.values(), key=lambda group: group[0])


def component_options(component: list[int], conflicts: set[frozenset[int]]) -> list[tuple[int, ...]]:
    """Every set of pairwise compatible items of `component`, the empty set included."""
    if len(component) > MAX_COMPONENT:
        raise OptionError(f"{len(component)} candidates exclude each other in one chain (at most {MAX_COMPONENT} "
                          "are solved exactly); restrict the candidates")
    options = []
    for size in range(len(component) + 1):
        for subset in itertools.combinations(component, size):
            if not any(frozenset(pair) in conflicts for pair in itertools.combinations(subset, 2)):
                options.append(subset)
    return options


def pareto_frontier(items: list[Item], conflicts: set[frozenset[int]]) -> list[tuple[float, float, tuple[int, ...]]]:
    """(total cost, total saving, chosen items) of every selection no other selection beats on both, by cost."""
    for item in items:
        if not item.cost >= 0:
            raise OptionError(f"candidate {item.name}: cost must be >= 0, got {item.cost!r}")
    frontier = [(0.0, 0.0, ())]
    for component in conflict_components(len(items), conflicts):
        options = [(sum(items[i].cost for i in option), sum(items[i].saving for i in option), option)
                   for option in component_options(component, conflicts)]
        combined = [(cost + extra_cost, saving + extra_saving, chosen + option)
                    for cost, saving, chosen in frontier for extra_cost, extra_saving, option in options]
        frontier = _non_dominated(combined)
    return frontier


def _non_dominated(points: list[tuple[float, float, tuple]]) -> list[tuple[float, float, tuple]]:
    kept, best = [], float("-inf")
    for cost, saving, chosen in sorted(points, key=lambda point: (point[0], -point[1])):
        if saving > best:
            kept.append((cost, saving, chosen))
            best = saving
    return kept


def _selection(items: list[Item], point: tuple[float, float, tuple[int, ...]]) -> Selection:
    cost, saving, chosen = point
    return Selection(tuple(items[i].name for i in sorted(chosen)), saving, cost)


def within_cost(items: list[Item], conflicts: set[frozenset[int]], budget: float) -> Selection:
    """The compatible items of largest total saving whose total cost is at most `budget`."""
    feasible = [point for point in pareto_frontier(items, conflicts) if point[0] <= budget]
    return _selection(items, max(feasible, key=lambda point: point[1]))


def reaching_saving(items: list[Item], conflicts: set[frozenset[int]], saving: float) -> Selection | None:
    """The compatible items of smallest total cost whose total saving is at least `saving`; None where no
    selection saves that much."""
    reaching = [point for point in pareto_frontier(items, conflicts) if point[1] >= saving]
    return _selection(items, min(reaching, key=lambda point: point[0])) if reaching else None
