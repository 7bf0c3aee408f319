"""The one-shot selection as a method of the loop (`method="oneshot"`): the whole plan chosen at once.

On the current model (the dense one, at step 1) it builds the candidate table (`selection.table`: every
activation run, residual block and off-channel group, with the latency it saves measured on the loop's lowering
and device), gives every candidate an importance, solves the selection exactly (`selection.knapsack`) and returns
the chosen candidates; the loop applies them, fine-tunes once (`epochs_per_step`, with distillation from the
dense model where `TrainConfig.distill` is set, and gradually where `anneal` is set) and stops. Importance:
- "probe" (Kim et al.'s protocol): each candidate applied alone to a copy of the model, fine-tuned for
  `probe_batches` batches (the same batches for every candidate), scored on the first `probe_samples`
  validation samples (the negative cross-entropy, or the objective's score); its cost is the score lost against
  the unchanged model probed the same way (a gain counts as 0). Each result is kept in the run folder
  (`probes.json`), so an interrupted probe resumes;
- "criterion": the thesis's criteria on the calibration batches (`selection.importance`), no training;
- "random": seeded random costs: a random selection reaching the same latency (the baseline).
The target is the loop's `latency_ratio` of the whole dense model's measured latency (the plan loses the least
summed cost while its predicted latency reaches it), or, with the `budget` option, the largest saving within that
summed cost. The table's prediction assumes its candidates add up; the chosen plan is measured whole, and where
it misses the target the table is asked for the miss more and the selection made again (`measured_selection`).
Candidates saving less than `min_saving` of the dense latency are neither probed nor chosen. The table, the costs,
each round (asked, predicted, measured) and the selection go to `selection.json` in the run folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..api import compress
from ..config import CompressConfig
from ..context import PassContext
from ..errors import OptionError
from ..measure import measure
from ..passes import ANALYSES
from ..plan import Plan
from ..progress import bar
from ..selection import SelectionResult, select
from ..selection.candidates import KINDS
from ..selection.importance import criterion_costs, random_costs
from ..selection.latency import LatencyTable, lowered_timer
from ..selection.table import CandidateTable, candidate_table
from ..trainable import apply_plan, base_of, plan_of, planned_graph
from .methods import Choice, Method, MethodOption, StepInputs, register_method

IMPORTANCES = ("probe", "criterion", "random")
MEASURED_ROUNDS = 4


@register_method
class OneShot(Method):
    name = "oneshot"
    once = True
    options = (
        MethodOption("importance", "probe", "what a candidate costs: a short fine-tune of the model with it (probe), "
                     "the criteria (criterion), or random (the baseline)", str, IMPORTANCES),
        MethodOption("budget", None, "instead of the loop's latency_ratio: the most summed importance to lose",
                     float, bounds=(0, float("inf"))),
        MethodOption("kinds", ",".join(KINDS), "the candidate kinds, comma-separated", str),
        MethodOption("probe_batches", 16, "training batches of each probe", int, bounds=(1, float("inf"))),
        MethodOption("probe_samples", 1000, "validation samples each probe is scored on", int,
                     bounds=(1, float("inf"))),
        MethodOption("min_saving", 0.005, "candidates saving less (a fraction of the dense latency) are left out",
                     float, bounds=(0, 1)),
    )

    def __init__(self, selection: str = "criterion", importance: str = "probe", budget: float | None = None,
                 kinds: str = ",".join(KINDS), probe_batches: int = 16,
                 probe_samples: int = 1000, min_saving: float = 0.005):
        super().__init__(selection)
        if importance not in IMPORTANCES:
            raise OptionError(f"oneshot importance must be one of {', '.join(IMPORTANCES)}, got {importance!r}")
        unknown = sorted(set(kinds.split(",")) - set(KINDS))
        if unknown:
            raise OptionError(f"unknown candidate kind(s) {', '.join(unknown)}; valid: {', '.join(KINDS)}")
        for name, value in (("probe_batches", probe_batches), ("probe_samples", probe_samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(f"oneshot option {name!r} must be an integer >= 1, got {value!r}")
        self.importance, self.budget, self.kinds = importance, budget, kinds
        self.probe_batches, self.probe_samples, self.min_saving = probe_batches, probe_samples, min_saving

    def choose(self, model: torch.nn.Module, inputs: StepInputs, count: int) -> list[Choice]:
        if self.importance == "probe" and inputs.probe is None:
            raise OptionError("oneshot importance 'probe' fine-tunes: it needs the built-in trainer (data=)")
        if (inputs.latency_ratio is None) == (self.budget is None):
            raise OptionError("method 'oneshot' needs either the loop's latency_ratio (the latency to reach) or its "
                              "budget option (the most importance to lose), not both")
        if self.importance == "criterion" and not inputs.calibration:
            raise OptionError("oneshot importance 'criterion' needs calibration batches")
        gm = planned_graph(model, inputs.example_inputs, inputs.captured)
        ANALYSES["annotate_bn_state"](gm, PassContext(CompressConfig(), "annotate_bn_state"))
        folder = inputs.folder
        threads = inputs.threads or torch.get_num_threads()
        latency = LatencyTable(lowered_timer(inputs.lowering, inputs.device, threads),
                               f"{inputs.lowering}|{inputs.device}|{threads} threads",
                               None if folder is None else folder / "latency_table.json")
        table = candidate_table(gm, inputs.example_inputs, latency, kinds=tuple(self.kinds.split(",")),
                                progress=inputs.progress)
        base_ms = self.timing(model, Plan(), inputs, threads)["dense"]["median_ms"]
        min_saving = self.min_saving * base_ms
        costs = self.costs(model, gm, table, inputs, min_saving)
        result, rounds = self.measured_selection(model, table, costs, base_ms, min_saving, inputs, threads)
        if folder is not None:
            _write_json(folder / "selection.json", {"table": table.to_dict(), "costs": costs, "rounds": rounds,
                                                    "selection": result.to_dict(), "options": self.option_values()})
        return [Choice(entry.candidate.name, entry.candidate.decisions, costs[entry.candidate.name])
                for entry in result.chosen]

    def measured_selection(self, model, table: CandidateTable, costs: dict, base_ms: float, min_saving: float,
                           inputs: StepInputs, threads: int) -> tuple[SelectionResult, list[dict]]:
        """The selection, its plan measured whole: where the measured ratio misses the loop's target, the target
        asked of the table is lowered by the miss and the selection made again (at most MEASURED_ROUNDS)."""
        asked, rounds = inputs.latency_ratio, []
        for _ in range(MEASURED_ROUNDS):
            result = select(table, costs, base_ms, latency_ratio=asked, budget=self.budget, min_saving=min_saving)
            measured = self.timing(model, result.plan, inputs, threads)["compressed"]["ratio"]
            rounds.append({"asked": asked, "predicted": result.predicted_ratio, "measured": measured,
                           "chosen": [entry.candidate.name for entry in result.chosen]})
            if asked is None or measured <= inputs.latency_ratio or not result.reached:
                break
            asked -= measured - inputs.latency_ratio
            if asked <= 0:
                break
        return result, rounds

    @staticmethod
    def timing(model: torch.nn.Module, plan: Plan, inputs: StepInputs, threads: int) -> dict:
        """The dense model against it compressed with `plan`, measured whole on the step's lowering."""
        base = base_of(model).eval()
        example = tuple(t.to(inputs.device) for t in inputs.example_inputs)
        compressed = compress(base, example, plan=Plan(plan_of(model).decisions + plan.decisions)).module
        return measure({"dense": base, "compressed": compressed}, example, lowering=inputs.lowering,
                       device=inputs.device, repeats=30, threads=threads)["results"]

    def costs(self, model, gm, table: CandidateTable, inputs: StepInputs, min_saving: float) -> dict[str, float]:
        if self.importance == "criterion":
            return criterion_costs(gm, table, inputs.calibration)
        if self.importance == "random":
            return random_costs(table, inputs.rng.randrange(2 ** 31))
        return probe_costs(model, table, inputs, self.probe_batches, self.probe_samples, min_saving)


def probe_costs(model: torch.nn.Module, table: CandidateTable, inputs: StepInputs, batches: int, samples: int,
                min_saving: float) -> dict[str, float]:
    """The probe cost (module docstring) of each usable candidate saving at least `min_saving` ms, resumed from
    and kept in `probes.json` of the run folder."""
    path = None if inputs.folder is None else inputs.folder / "probes.json"
    scores = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    wanted = [entry.candidate for entry in table.entries if entry.usable and entry.saving_ms >= min_saving]
    seed = 0
    for candidate in bar([None] + wanted, "probing candidates", inputs.progress):  # None: the unchanged model
        key = "unchanged" if candidate is None else candidate.name
        if key in scores:
            continue
        plan = Plan(() if candidate is None else candidate.decisions)
        probed = apply_plan(model, plan, inputs.example_inputs, inputs.captured)
        scores[key] = inputs.probe(probed, batches, samples, seed)
        if path is not None:
            _write_json(path, scores)
    return {candidate.name: max(0.0, scores["unchanged"] - scores[candidate.name]) for candidate in wanted}


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)
