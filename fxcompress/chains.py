"""Split a chain of linear operators into segments, each merged into one operator.

Pure algorithm, no FX: the caller supplies how to compose two specs and what a spec costs. Merging is
monotone along a chain (if a segment cannot merge, no longer segment containing it can), so every
segment start is extended until composition refuses, and a dynamic programme picks the segmentation
with the lowest cost; with `force` it picks the fewest operators instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

Spec = TypeVar("Spec")


@dataclass(frozen=True)
class Segment(Generic[Spec]):
    start: int
    stop: int  # exclusive
    spec: Spec
    exact: bool


def segment_chain(specs: Sequence[Spec], compose: Callable[[Spec, Spec, int], tuple[Spec, bool] | None],
                  cost: Callable[[Spec, int, int], tuple[float, int]], force: bool,
                  refusals: dict[int, str] | None = None) -> list[Segment[Spec]]:
    """Best segmentation of `specs`.

    compose(a, b, j) merges spec a (covering specs[..j-1]) with specs[j], returning (merged, exact) or None.
    cost(spec, start, end) is (cost, params) of a spec that maps the input of specs[start] to the output of
    specs[end]. Without `force`, a merged segment must cost no more and have no more parameters than its parts;
    where the merge of specs[j - 1] and specs[j] alone is refused so, `refusals[j]` says why.
    """
    n = len(specs)
    unit_costs = [cost(spec, j, j) for j, spec in enumerate(specs)]
    candidates: dict[tuple[int, int], Segment] = {}
    for start in range(n):
        candidates[start, start + 1] = Segment(start, start + 1, specs[start], True)
        merged, exact = specs[start], True
        for j in range(start + 1, n):
            step = compose(merged, specs[j], j)
            if step is None:
                break
            merged, exact = step[0], exact and step[1]
            value, params = cost(merged, start, j)
            parts = unit_costs[start:j + 1]
            cheaper = value <= sum(c[0] for c in parts) and params <= sum(c[1] for c in parts)
            if force or cheaper:
                candidates[start, j + 1] = Segment(start, j + 1, merged, exact)
            elif refusals is not None and j == start + 1:
                total = tuple(sum(c[i] for c in parts) for i in (0, 1))
                refusals[j] = f"the merge would cost more: cost {_number(value)} vs {_number(total[0])}, " \
                              f"params {params:,} vs {total[1]:,} (force merges anyway)"

    def key(segment: Segment) -> tuple[float, int]:
        value = cost(segment.spec, segment.start, segment.stop - 1)[0]
        return (1, value) if force else (value, 1)

    best: list[tuple[tuple[float, int], list[Segment]]] = [((0, 0), [])]
    for stop in range(1, n + 1):
        options = []
        for start in range(stop):
            segment = candidates.get((start, stop))
            if segment is not None:
                total, chosen = best[start]
                step = key(segment)
                options.append(((total[0] + step[0], total[1] + step[1]), chosen + [segment]))
        best.append(min(options, key=lambda option: option[0]))
    return best[n][1]


def _number(value: float) -> str:
    """MACs as a whole number, milliseconds with four significant digits."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4g}"
