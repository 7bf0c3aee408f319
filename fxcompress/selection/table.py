"""The candidate table: every candidate with what it saves on the target and which others it excludes.

Each candidate (`candidates.find_candidates`) is applied alone to a copy of the captured graph and compressed
with the exact passes (`pipeline.compress_graph`); against the exact model (the same graph compressed without a
plan) it saves measured latency (`latency.LatencyTable`), MACs and parameters. A candidate whose decisions
cannot be applied keeps the reason and is never chosen.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import fx

from ..config import CompressConfig
from ..errors import PassError, PlanError
from ..pipeline import compress_graph
from ..plan import Plan
from ..progress import bar
from .candidates import KINDS, MAX_RUN, Candidate, conflicts, find_candidates, neighbours
from .latency import LatencyTable


@dataclass(frozen=True)
class Entry:
    candidate: Candidate
    saving_ms: float | None = None  # measured on the table's lowering; None where it cannot be applied or timed
    macs_saved: int = 0
    params_saved: int = 0
    refusal: str = ""  # why it cannot be applied

    @property
    def usable(self) -> bool:
        return self.saving_ms is not None and not self.refusal

    def to_dict(self) -> dict:
        return {"name": self.candidate.name, "kind": self.candidate.kind,
                "decisions": [{"action": d.action, "target": d.target, "params": d.params}
                              for d in self.candidate.decisions],
                "saving_ms": self.saving_ms, "macs_saved": self.macs_saved, "params_saved": self.params_saved,
                "refusal": self.refusal}


@dataclass
class CandidateTable:
    entries: list[Entry]
    conflicts: set[frozenset[int]]  # index pairs of entries that exclude each other
    exact_macs: int = 0
    exact_params: int = 0
    notes: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"entries": [entry.to_dict() for entry in self.entries],
                "conflicts": sorted(sorted(pair) for pair in self.conflicts),
                "exact_macs": self.exact_macs, "exact_params": self.exact_params, **self.notes}


def _compressed(gm: fx.GraphModule, example_inputs: tuple, config: CompressConfig, plan: Plan):
    with torch.no_grad():
        return compress_graph(copy.deepcopy(gm), example_inputs, config, plan)


def candidate_table(gm: fx.GraphModule, example_inputs, latency: LatencyTable, *, kinds: tuple[str, ...] = KINDS,
                    max_run: int = MAX_RUN, config: CompressConfig | None = None, progress: bool = False
                    ) -> CandidateTable:
    """The table of the candidates of `kinds` on `gm` (captured, names and shapes annotated; BatchNorm states
    for remove_channels), each timed with `latency` against the exact model."""
    config = config or CompressConfig()
    example_inputs = tuple(example_inputs)
    exact, exact_report = _compressed(gm, example_inputs, config, Plan())
    candidates = find_candidates(gm, kinds, max_run)
    entries = []
    for candidate in bar(candidates, "timing candidates", progress):
        try:
            compressed, report = _compressed(gm, example_inputs, config, Plan(candidate.decisions))
        except (PlanError, PassError) as error:
            entries.append(Entry(candidate, refusal=str(error)))
            continue
        entries.append(Entry(candidate, latency.saving(exact, compressed),
                             exact_report.after.macs - report.after.macs,
                             exact_report.after.params - report.after.params))
    return CandidateTable(entries, conflicts(candidates, neighbours(gm)), exact_report.after.macs,
                          exact_report.after.params)
