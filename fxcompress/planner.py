"""From criterion scores and a budget to a `Plan`.

Criteria (each an analysis pass, then candidates in order):
- "entropy": linearise activations, lowest layer entropy first (EASIER); needs calibration data. The state
  is z >= the lower end of the identity range (`ops.activation_regions`; the sign of z for LeakyReLU,
  GELU, SiLU, Hardswish). Entropy ranks, it claims no exactness: linearising gives z where the activation
  gave 0, a constant (Hardtanh), slope * z (LeakyReLU) or GELU(z), even in a layer of entropy 0 whose
  channels are always below the range; the published method fine-tunes after each step.
- "bn": TLC, data-free where a BatchNorm feeds the activation (calibration statistics stand in elsewhere):
  an activation whose channels are confidently on or off (with aggregate="max" every channel's error
  probability <= max_error; with "mean" the expected fraction of misjudged channels), none saturated, is
  linearised, its off channels handled first: removed structurally where every consumer of their channel
  group reads an activation output judged off for them, else zeroed in the op that feeds the activation.
  Only an activation whose output below its identity range is exactly 0 (ReLU, ReLU6, Hardtanh(0, max))
  may have off channels; a layer with off channels that output a nonzero constant (Hardtanh) or slope * z
  (LeakyReLU) is refused, and GELU, SiLU and Hardswish, only approximately 0 or z, always are.
- "ot": replace residual blocks by their shortcut, smallest LaCoOT block distance first; needs calibration.

Budgets (at most one): `activations` (how many candidates to take), `macs_ratio` (take candidates until
compressed MACs / original MACs <= the ratio), `max_drop` with an `evaluator` (greedy: try each candidate,
compress, evaluate, keep it if the drop from the original's score stays within max_drop). Without a
budget "bn" takes every candidate (max_error decides) and the others refuse. Candidates that unlock a merge
(an activation between two linear ops, so that removing it lets them merge) come before those that only
delete an activation; the result counts both.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx

from . import meta
from .blocks import channel_group
from .capture import capture, check_inputs
from .config import CompressConfig
from .context import Calibration, PassContext
from .criteria import OFF, ON
from .errors import OptionError, finite_number, valid_choice
from .graph import annotate_names, annotate_shapes, real_users, stable_name
from .ops import OpCall, activation_regions, bind
from .passes import ANALYSES
from .pipeline import compress_graph
from .plan import Decision, Plan

CRITERIA = ("entropy", "bn", "ot")
AGGREGATES = ("max", "mean")
PLANNER_OPTIONS = ("activations", "macs_ratio", "max_drop", "evaluator", "aggregate", "progress")
_ANALYSES = {"entropy": ("annotate_entropy",), "bn": ("annotate_bn_state",), "ot": ("annotate_block_distance",)}


@dataclass(frozen=True)
class Candidate:
    target: str  # stable name of the activation or residual add
    decisions: tuple[Decision, ...]
    score: float  # lower is removed first: layer entropy, layer error probability, block distance
    unlocks_merge: bool


@dataclass
class PlanResult:
    plan: Plan
    scores: dict[str, float]  # every scored target: layer entropy, layer error probability, block distance
    unlocking: int = 0  # chosen decisions that put two linear ops next to each other
    deleting_only: int = 0  # chosen decisions that only delete an activation (or a block)
    refused: dict[str, str] = field(default_factory=dict)  # target -> why it is not in the plan
    steps: list[dict] = field(default_factory=list)  # greedy trajectory: target, macs_ratio, score


def unlocks_merge(node: fx.Node) -> bool:
    """Whether activation `node` sits alone between two conv/linear ops (BatchNorm and dropout aside)."""
    producer = bind(node)["input"]
    while (call := bind(producer) if isinstance(producer, fx.Node) else None) is not None and \
            call.kind in ("batch_norm", "dropout") and len(real_users(producer)) == 1:
        producer = call["input"]
    if call is None or call.kind not in ("conv", "linear") or len(real_users(producer)) != 1:
        return False
    current = node
    while len(users := real_users(current)) == 1 and (call := bind(users[0])) is not None:
        if call.kind != "dropout":
            return call.kind in ("conv", "linear") and call["input"] is current
        current = users[0]
    return False


def _zero_below(call: OpCall, approximate: bool) -> bool:
    """Whether the activation outputs 0 below its identity range (or approximately 0, where `approximate`)."""
    return activation_regions(call).below in (("zero", "approximately zero") if approximate else ("zero",))


def _zero_at(node: fx.Node, channels: set[int], max_error: float, approximate: bool = False) -> bool:
    """Whether the criterion judges `node`'s output zero on `channels` with error probability <= max_error
    (an off activation, maybe pooled; approximately zero counts where `approximate`)."""
    call = bind(node)
    if call is not None and call.kind in ("pool", "dropout"):
        return _zero_at(call["input"], channels, max_error, approximate)
    if call is None or call.kind != "activation" or not _zero_below(call, approximate) or \
            meta.CHANNEL_STATES not in node.meta:
        return False
    states = node.meta[meta.CHANNEL_STATES]
    labels = states.states()
    return all(labels[c] == OFF and states.error[c] <= max_error for c in channels)


def _zeroable(node: fx.Node) -> bool:
    source = bind(node)["input"]
    call = bind(source) if isinstance(source, fx.Node) else None
    return call is not None and call.kind in ("batch_norm", "conv", "linear") and len(real_users(source)) == 1


def off_decision(gm: fx.GraphModule, node: fx.Node, off: list[int], max_error: float,
                 approximate: bool = False) -> Decision | str:
    """Remove the off channels where every consumer of their group reads a zero judged off; else zero them.
    `approximate`: an approximately zero output (GELU, SiLU below 0) counts as a zero."""
    name = stable_name(node)
    group = channel_group(gm, node, off)
    why = str(group)
    if group:
        unjudged = [(consumer, bind(consumer)["input"]) for consumer in group.consumers
                    if not _zero_at(bind(consumer)["input"], group.members[bind(consumer)["input"]], max_error,
                                    approximate)]
        if not unjudged:
            return Decision("remove_channels", name, {"channels": off})
        consumer, source = unjudged[0]
        why = f"they reach {stable_name(consumer)} through {stable_name(source)}, not judged off there"
    if _zeroable(node):
        return Decision("zero_channels", name, {"channels": off})
    return f"off channels can be neither removed ({why}) nor zeroed (input not a BatchNorm/conv used only here)"


def layer_error(states, aggregate: str) -> float:
    """A layer's error: the largest channel error probability ("max"), or the expected fraction of channels
    misjudged ("mean")."""
    return float(states.error.max() if aggregate == "max" else states.error.mean())


def regions_refusal(node: fx.Node, off: list[int], approximate: bool = False) -> str | None:
    """Why the activation's regions make its states inexact: only a zero below the identity range can be
    removed or zeroed, and linearising is exact only where the output is z. `approximate` accepts the
    regions that hold only approximately (GELU, SiLU, Hardswish: about 0 below 0, about z above)."""
    call = bind(node)
    regions = activation_regions(call)
    if not regions.exact and not approximate:
        return f"{call.name} is only approximately 0 below {regions.low} and approximately z above it"
    if off and not _zero_below(call, approximate):
        return f"off channels {off} output {regions.describe_below()}, not 0: they can be neither removed " \
               "nor zeroed, and linearising would make them z"
    return None


def approximation_error(node: fx.Node, mean: torch.Tensor, std: torch.Tensor, points: int = 801) -> float:
    """How far activation `node`, 0 below its identity range exactly or approximately, is from its regions' exact
    form (0 below `low`, z on [low, high], `high` above): the relative RMS of the difference,
    sqrt(sum_c E(f(z_c) - exact(z_c))^2 / sum_c E f(z_c)^2), for channels z_c ~ N(mean_c, std_c^2) (the measured
    statistics), integrated on a grid of `points` within 8 std. 0 for ReLU; inf where f is 0 throughout."""
    regions = activation_regions(bind(node))
    grid = torch.linspace(-8.0, 8.0, points, dtype=torch.float64, device=mean.device)
    weights = torch.exp(-grid * grid / 2)
    weights = weights / weights.sum()
    z = mean.double()[:, None] + std.double().abs()[:, None] * grid
    output = node.target(z.clone(), *node.args[1:], **node.kwargs)
    exact = torch.where(z < regions.low, torch.zeros_like(z), z.clamp(max=regions.high))
    deviation = ((output - exact) ** 2 * weights).sum()
    energy = (output ** 2 * weights).sum()
    return math.sqrt(float(deviation / energy)) if energy > 0 else math.inf


def _bn_candidate(gm: fx.GraphModule, node: fx.Node, max_error: float, aggregate: str) -> Candidate | str:
    states = node.meta[meta.CHANNEL_STATES]
    error = layer_error(states, aggregate)
    if not math.isfinite(error):
        return "channel error probability is not finite (non-finite BatchNorm weight or bias)"
    if error > max_error:
        return f"{aggregate} channel error probability {error:.3g} > max_error {max_error}"
    labels = states.states()
    if any(label not in (ON, OFF) for label in labels):
        return "some channels saturate (upper kink)"
    off = [c for c, label in enumerate(labels) if label == OFF]
    if len(off) == len(labels):
        return "every channel is off: the layer is dead, not linear"
    refusal = regions_refusal(node, off)
    if refusal is not None:
        return refusal
    decisions = [Decision("linearize", stable_name(node))]
    if off:
        decision = off_decision(gm, node, off, max_error)
        if isinstance(decision, str):
            return decision
        decisions.insert(0, decision)
    return Candidate(stable_name(node), tuple(decisions), error, unlocks_merge(node))


def _candidates(gm: fx.GraphModule, criterion: str, max_error: float, aggregate: str,
                result: PlanResult) -> list[Candidate]:
    found = []
    for node in gm.graph.nodes:
        name = stable_name(node)
        if criterion == "ot":
            if meta.BLOCK_DISTANCE in node.meta:
                result.scores[name] = node.meta[meta.BLOCK_DISTANCE]
                found.append(Candidate(name, (Decision("remove_block", name),), result.scores[name], False))
            continue
        call = bind(node)
        if call is None or call.kind != "activation":
            continue
        if criterion == "entropy":
            if meta.ACTIVATION_STATS in node.meta:
                result.scores[name] = node.meta[meta.ACTIVATION_STATS].layer_entropy
                found.append(Candidate(name, (Decision("linearize", name),), result.scores[name],
                                       unlocks_merge(node)))
            continue
        if meta.CHANNEL_STATES not in node.meta:
            result.refused[name] = "no BatchNorm before it and no calibration statistics"
            continue
        result.scores[name] = layer_error(node.meta[meta.CHANNEL_STATES], aggregate)
        candidate = _bn_candidate(gm, node, max_error, aggregate)
        if isinstance(candidate, str):
            result.refused[name] = candidate
        else:
            found.append(candidate)
    return sorted(found, key=lambda c: (not c.unlocks_merge, c.score))


def check_max_error(max_error) -> None:
    if not 0 <= finite_number("option 'max_error'", max_error) < 1:
        raise OptionError(f"option 'max_error' must be a number in [0, 1), got {max_error!r}")


def _score(evaluator: Callable, module: fx.GraphModule, which: str) -> float:
    """The evaluator's score of the original or a compressed module: a finite number (or a one-element tensor)."""
    score = evaluator(module)
    if isinstance(score, torch.Tensor) and score.numel() == 1:
        score = score.item()
    return finite_number(f"the evaluator's score of the {which} model (higher is better)", score)


def _check_budget(criterion, activations, macs_ratio, max_drop, evaluator) -> None:
    given = [name for name, value in (("activations", activations), ("macs_ratio", macs_ratio),
                                      ("max_drop", max_drop)) if value is not None]
    if len(given) > 1:
        raise OptionError(f"give at most one budget, got {', '.join(given)}")
    if not given and criterion != "bn":
        raise OptionError(f"criterion {criterion!r} needs a budget: activations, macs_ratio or max_drop with an "
                          "evaluator, as keywords of find_plan or in compress(..., planner={'activations': N})")
    if activations is not None and (not isinstance(activations, int) or activations < 0):
        raise OptionError(f"budget 'activations' must be an int >= 0, got {activations!r}")
    if macs_ratio is not None and not 0 < finite_number("budget 'macs_ratio'", macs_ratio) <= 1:
        raise OptionError(f"budget 'macs_ratio' must be in (0, 1], got {macs_ratio!r}")
    if max_drop is not None:
        finite_number("budget 'max_drop'", max_drop)
        if not callable(evaluator):
            raise OptionError("budget 'max_drop' needs evaluator=callable(module) -> score (higher is better)")


def plan_graph(gm: fx.GraphModule, example_inputs, *, criterion: str = "bn", calibration=None,
               max_error: float = 0.01, aggregate: str = "max", activations: int | None = None,
               macs_ratio: float | None = None, max_drop: float | None = None, evaluator: Callable | None = None,
               config: CompressConfig | None = None, progress: bool = False, model: str = "") -> PlanResult:
    """Score a captured graph (names and shapes annotated, edited in place only in node.meta) and plan."""
    valid_choice("criterion", criterion, CRITERIA)
    valid_choice("aggregate", aggregate, AGGREGATES)
    _check_budget(criterion, activations, macs_ratio, max_drop, evaluator)
    check_max_error(max_error)
    config = config or CompressConfig()
    calibration = None if calibration is None else Calibration(calibration, progress, tuple(example_inputs))
    analyses = _ANALYSES[criterion]
    if criterion == "bn" and calibration is not None:
        analyses = ("annotate_entropy",) + analyses  # calibration mean/std stand in for norm-free layers
    for name in analyses:
        ANALYSES[name](gm, PassContext(config, name, calibration=calibration))
    result = PlanResult(Plan(model=model), {})
    candidates = _candidates(gm, criterion, max_error, aggregate, result)

    def compressed(decisions):
        with torch.no_grad():
            return compress_graph(copy.deepcopy(gm), example_inputs, config, Plan(tuple(decisions), model))

    chosen: list[Candidate] = []
    baseline = _score(evaluator, gm, "original") if max_drop is not None else None
    for candidate in candidates:
        if activations is not None and len(chosen) >= activations:
            result.refused[candidate.target] = f"over the budget of {activations}"
            continue
        step = {"target": candidate.target, "score": candidate.score}
        if macs_ratio is not None or max_drop is not None:
            module, report = compressed([d for c in chosen + [candidate] for d in c.decisions])
            step["macs_ratio"] = report.after.macs / report.before.macs
            if max_drop is not None:
                step["evaluation"] = _score(evaluator, module, "compressed")
                if baseline - step["evaluation"] > max_drop:
                    result.refused[candidate.target] = f"score drops {baseline - step['evaluation']:.4g} > max_drop"
                    continue
        chosen.append(candidate)
        result.steps.append(step)
        if macs_ratio is not None and step["macs_ratio"] <= macs_ratio:
            break
    result.plan = Plan(tuple(d for c in chosen for d in c.decisions), model)
    result.unlocking = sum(c.unlocks_merge for c in chosen)
    result.deleting_only = len(chosen) - result.unlocking
    return result


def find_plan(model: torch.nn.Module, example_inputs, *, criterion: str = "bn", calibration=None,
              max_error: float = 0.01, aggregate: str = "max", activations: int | None = None,
              macs_ratio: float | None = None, max_drop: float | None = None, evaluator: Callable | None = None,
              config: CompressConfig | None = None, progress: bool = False) -> PlanResult:
    """Capture `model`, score it with `criterion` and plan within the budget (see the module docstring).

    calibration: an iterable of batches (a list or DataLoader; tuples keep their first elements as inputs).
    evaluator: callable(module) -> score, higher is better; it receives compressed GraphModules.
    The caller's model is never modified.
    """
    example_inputs = check_inputs(model, example_inputs)
    with torch.no_grad():
        gm = capture(model, example_inputs)
    annotate_names(gm)
    annotate_shapes(gm, example_inputs)
    return plan_graph(gm, example_inputs, criterion=criterion, calibration=calibration, max_error=max_error,
                      aggregate=aggregate, activations=activations, macs_ratio=macs_ratio, max_drop=max_drop,
                      evaluator=evaluator, config=config, progress=progress, model=type(model).__name__)
