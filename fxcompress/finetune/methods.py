"""The methods' choices, one step at a time, on the current (planned, fine-tuned) model.

Each method scores the graph of the current model with its plan applied (`trainable.planned_graph`: the
activations already linearised are gone from it) and returns the decisions of this step:
- "easier" (EASIER): the `count` activations of lowest layer entropy, plus every activation of entropy 0 (the
  published code takes those in the same step). Entropy is measured on calibration batches in eval mode
  (the paper averages it over the last training epoch, in train mode).
- "tlc" (TLC): activations fed by a BatchNorm (or, with calibration, any activation: its measured mean and
  std stand in), with channels judged off where beta < 0 (the Gaussian ON/OFF states: `criteria`); the off
  channels are removed structurally where every consumer of their group reads a channel judged off, else
  zeroed (`planner.off_decision`), and the activation is linearised. Ranked by the expected fraction of
  misjudged channels (`rank="error"`), or, as the published code does, by the loss increase on one
  validation batch when the candidate alone is applied (`rank="loss"`, one `apply_plan` per candidate).
  Activations only approximately 0 below 0 and z above (GELU, SiLU: a ViT's MLP) are taken too, with calibration
  (the fine-tune recovers; the published setting is ReLU only): their off channels removed as zeros, their
  error-fraction score plus how far they are from exactly 0 / z (`planner.approximation_error`).
- "lacoot" (LaCoOT): residual blocks with an identity shortcut, smallest block distance on the calibration batches
  first, each removed (`remove_block`); the loop trains with its regulariser (`lacoot.BlockDistanceRegulariser`,
  weight 0: plain training, the baseline).
- "random": `count` remaining activations in a seeded random order (a baseline).
- "control": nothing: the loop only fine-tunes (extra training alone improves a model).
- "egp" (EGP/NEPENTHE), "magnitude" and "dsd2": a round of unstructured pruning per step (`sparsity`): `rate` of
  the unpruned weights of the layers that feed an activation (`scope="feeding"`; `scope="all"`: every conv and
  linear, the output layer included, by magnitude only), split by EGP's entropy-guided budget ("egp") or
  globally by magnitude ("magnitude", the baseline). First (unless `collapse=False`), every activation of zero
  entropy on the calibration batches (each channel always on or always off: what pruning drives layers to)
  collapses: it is linearised and its always-off channels removed or zeroed (`collapse_choice`). "dsd2" (DSD²)
  prunes by magnitude (or EGP's split) 20 % per round and has the loop distil the dense model into the pruned
  one (alpha 0.8, T 10).

`selection="criterion"` takes the candidates in the criterion's order (the papers). `selection="latency"` also
forms joint candidates, pairs of activations that follow each other in a chain (the two of an inverted
residual: linearised together, the block and its shortcut merge into one dense conv, where either alone
unlocks only a merge that costs more), and takes, best score first, those whose merges make the compressed
model cheaper in MACs (LayerMerge's point: choose what actually runs faster); `latency_choice`.
"""
from __future__ import annotations

import copy
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import fx

from .. import meta
from ..blocks import monitored_blocks
from ..config import CompressConfig
from ..context import Calibration, PassContext
from ..criteria import OFF
from ..errors import OptionError, PassError, PlanError, finite_number
from ..graph import names_of_kind, nodes_of_kind, stable_name
from ..ops import activation_regions, bind
from ..passes import ANALYSES
from ..pipeline import compress_graph
from ..plan import Decision, Plan
from ..planner import approximation_error, layer_error, off_decision, regions_refusal
from ..selection.candidates import next_activation
from ..trainable import apply_plan, planned_graph
from .lacoot import BlockDistanceRegulariser, measured_distances, planned_model, positive_integer
from .sparsity import (current_mask, effective_weight, egp_amounts, feeding_layers, global_magnitude_masks,
                       layer_magnitude_masks, layer_modules)

TLC_RANKS = ("error", "loss")
PRUNING_SPLITS = ("magnitude", "egp")
PRUNING_SCOPES = ("feeding", "all")
SELECTIONS = ("criterion", "latency")
JOINT_LIMIT = 12  # single candidates whose MACs after merging the latency selection measures (and every pair)


@dataclass(frozen=True)
class MethodOption:
    """An option a method declares: its name (a keyword of the method's constructor and a key of `prune`'s
    `method_options`), default, type (int, float, str, bool), allowed values, command-line flag and help."""

    name: str
    default: object
    help: str
    type: type = float
    choices: tuple = ()
    flag: str = ""  # without the leading dashes; default: the name with dashes
    bounds: tuple[float, float] = (float("-inf"), float("inf"))  # of a number, inclusive (the CLI checks them)

    @property
    def cli_flag(self) -> str:
        return "--" + (self.flag or self.name.replace("_", "-"))


@dataclass(frozen=True)
class Choice:
    target: str  # the activation or block chosen
    decisions: tuple[Decision, ...]
    score: float  # the criterion's score (lower goes first); nan for random
    masks: dict | None = None  # weight masks by module path (pruning methods), applied with the decisions


@dataclass
class StepInputs:
    """What a method may read to choose: the example inputs, calibration batches (inputs only), one labelled
    validation batch (TLC's loss ranking), the step's random generator and, for the one-shot selection, where
    latency is measured, a probe (fine-tune a planned copy briefly, return its validation score: `Probe`), the
    run folder to keep its tables in, and the model's captured graph (pass it on to `planned_graph` and
    `apply_plan` as `captured=`)."""

    example_inputs: tuple
    calibration: list
    validation_batch: tuple | None
    rng: random.Random
    progress: bool = False  # a progress bar over the calibration batches
    lowering: str = "onnxruntime"
    device: str = "cpu"
    threads: int | None = None  # CPU threads latency is measured on (None: torch's current number)
    probe: "Probe | None" = None
    folder: Path | None = None
    latency_ratio: float | None = None  # the loop's latency budget, which the one-shot selection reaches
    captured: fx.GraphModule | None = None  # the model's `base_graph`, captured once per step by the loop


class Probe(Protocol):
    """Fine-tune `model` (a planned copy, changed in place) for `batches` batches seeded by `seed`, then return its
    score on the first `samples` validation samples, higher is better."""

    def __call__(self, model: torch.nn.Module, batches: int, samples: int, seed: int) -> float: ...


def _analyse(gm: fx.GraphModule, names: tuple[str, ...], inputs: StepInputs) -> None:
    calibration = Calibration(inputs.calibration, inputs.progress, inputs.example_inputs) \
        if inputs.calibration else None
    for name in names:
        ANALYSES[name](gm, PassContext(CompressConfig(), name, calibration=calibration))


class Method:
    """A method ranks candidates on the current model's graph; `choose` takes the first `count` of them, or,
    with `selection="latency"`, the best that make the compressed model cheaper (`latency_choice`)."""

    name = ""
    once = False  # chooses the whole plan in one step: the loop then stops after that step
    options: ClassVar[tuple[MethodOption, ...]] = ()  # the method's own options (`make_method`, the CLI)
    distillation: tuple[float, float] | None = None  # (weight, temperature) the loop distils with (DSD²)
    only: re.Pattern | None = None  # `restrict`: the targets the method may choose

    def __init__(self, selection: str = "criterion"):
        if selection not in SELECTIONS:
            raise OptionError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
        self.selection = selection

    def candidates(self, gm: fx.GraphModule, model: torch.nn.Module, inputs: StepInputs) -> list[Choice]:
        raise NotImplementedError

    def take(self, gm: fx.GraphModule, candidates: list[Choice], count: int, example_inputs) -> list[Choice]:
        """The first `count` candidates that can be applied together (`applicable`)."""
        chosen = []
        for candidate in candidates:
            if len(chosen) == count:
                break
            if applicable(gm, chosen + [candidate], example_inputs):
                chosen.append(candidate)
        return chosen

    def choose(self, model: torch.nn.Module, inputs: StepInputs, count: int) -> list[Choice]:
        gm = planned_graph(model, inputs.example_inputs, inputs.captured)
        candidates = [choice for choice in self.candidates(gm, model, inputs)
                      if self.only is None or self.only.search(choice.target)]
        chosen = latency_choice(gm, candidates, count, inputs.example_inputs) \
            if self.selection == "latency" and candidates else []
        return chosen or self.take(gm, candidates, count, inputs.example_inputs)

    def restrict(self, pattern: str) -> None:
        """Choose only the activations or blocks whose stable names `pattern` (a regular expression) matches."""
        try:
            self.only = re.compile(pattern)
        except (re.error, TypeError) as error:
            raise OptionError(f"option 'only' must be a regular expression, got {pattern!r}: {error}") from error

    def option_values(self) -> dict:
        """The values of the method's options, by name (what a run records and resume compares)."""
        return {option.name: getattr(self, option.name) for option in self.options}

    @property
    def needs_trainer(self) -> bool:
        """Whether the method trains with its own loss, which only the built-in trainer computes."""
        return self.distillation is not None

    @property
    def keeps_structure(self) -> bool:
        """Whether the method's choices leave every layer and weight shape as it is (weight masks at most): what
        rewinding the weights to their initial values needs."""
        return False

    def regulariser(self, model: torch.nn.Module, example_inputs):
        """The training regulariser the loop trains with (`trainer.train(regulariser=)`); None: plain loss."""
        return None


class Easier(Method):
    name = "easier"

    def candidates(self, gm: fx.GraphModule, model: torch.nn.Module, inputs: StepInputs) -> list[Choice]:
        if not inputs.calibration:
            raise OptionError("method 'easier' needs calibration batches")
        _analyse(gm, ("annotate_entropy",), inputs)
        scored = sorted((node.meta[meta.ACTIVATION_STATS].layer_entropy, stable_name(node))
                        for node in gm.graph.nodes if meta.ACTIVATION_STATS in node.meta)
        return [Choice(name, (Decision("linearize", name),), entropy) for entropy, name in scored]

    def take(self, gm: fx.GraphModule, candidates: list[Choice], count: int, example_inputs) -> list[Choice]:
        return [choice for index, choice in enumerate(candidates) if index < count or choice.score == 0]


class Tlc(Method):
    name = "tlc"
    options = (MethodOption("rank", "error", "rank by the expected fraction of misjudged channels (error) or by "
                            "the loss increase on a validation batch (loss, the published code)", str, TLC_RANKS,
                            "tlc-rank"),)

    def __init__(self, selection: str = "criterion", rank: str = "error"):
        super().__init__(selection)
        if rank not in TLC_RANKS:
            raise OptionError(f"TLC rank must be one of {', '.join(TLC_RANKS)}, got {rank!r}")
        self.rank = rank

    def candidates(self, gm: fx.GraphModule, model: torch.nn.Module, inputs: StepInputs) -> list[Choice]:
        _analyse(gm, (("annotate_entropy",) if inputs.calibration else ()) + ("annotate_bn_state",), inputs)
        found = [choice for node in gm.graph.nodes if meta.CHANNEL_STATES in node.meta
                 and (choice := _tlc_choice(gm, node)) is not None]
        if self.rank == "loss":
            current = _validation_loss(model, inputs)
            found = [Choice(c.target, c.decisions, _validation_loss(
                apply_plan(model, Plan(c.decisions), inputs.example_inputs, inputs.captured), inputs) - current)
                for c in found]
        return sorted(found, key=lambda choice: choice.score)


def _tlc_choice(gm: fx.GraphModule, node: fx.Node) -> Choice | None:
    """Linearise `node` with its off channels removed or zeroed; None where that cannot be done (every channel
    off, off channels that do not output 0, no way to remove or zero them, an approximate activation without
    measured statistics). Scored by the expected fraction of misjudged channels, plus, for an activation whose
    regions are approximate (GELU, SiLU: about 0 off, about z on), its `approximation_error` there."""
    states = node.meta[meta.CHANNEL_STATES]
    labels = states.states()
    off = [channel for channel, label in enumerate(labels) if label == OFF]
    approximate = not activation_regions(bind(node)).exact
    if len(off) == len(labels) or (approximate and meta.ACTIVATION_STATS not in node.meta):
        return None
    decisions = linearised_without(gm, node, off, approximate)
    if decisions is None:
        return None
    error = layer_error(states, "mean")
    if approximate:
        stats = node.meta[meta.ACTIVATION_STATS]
        error += approximation_error(node, stats.mean, stats.std)
    return Choice(stable_name(node), decisions, error if math.isfinite(error) else math.inf)


def linearised_without(gm: fx.GraphModule, node: fx.Node, off: list[int],
                       approximate: bool = False) -> tuple[Decision, ...] | None:
    """The decisions that linearise the activation `node` with its `off` channels removed or zeroed; None where
    its regions make that inexact (unless `approximate`: approximately 0 and z count as 0 and z) or the channels
    can be neither removed nor zeroed."""
    if regions_refusal(node, off, approximate) is not None:
        return None
    decisions = [Decision("linearize", stable_name(node))]
    if off:
        decision = off_decision(gm, node, off, max_error=1.0, approximate=approximate)
        if isinstance(decision, str):
            return None
        decisions.insert(0, decision)
    return tuple(decisions)


def _validation_loss(model: torch.nn.Module, inputs: StepInputs) -> float:
    """The model's loss on the validation batch, in eval mode (TLC ranks candidates by its increase)."""
    if inputs.validation_batch is None:
        raise OptionError("TLC's loss ranking needs a validation batch")
    *batch, labels = inputs.validation_batch
    with torch.no_grad():
        return F.cross_entropy(model.eval()(*batch), labels).item()


class Lacoot(Method):
    """LaCoOT's choices: the monitored blocks still present, smallest block distance first, each removed by
    `remove_block` of its adds (a transformer layer's attention and MLP together); the distances are measured on
    the step's calibration batches (`block_distances`).
    `regulariser` gives the training penalty of weight `weight` (None at weight 0: plain training, the
    baseline), with `projections` random projections."""

    name = "lacoot"
    options = (MethodOption("weight", 9.0, "LaCoOT's lambda (0: plain training, the baseline)", float,
                            flag="lacoot-weight", bounds=(0, float("inf"))),
               MethodOption("projections", 50, "LaCoOT's max-sliced projections", int, bounds=(1, float("inf"))))

    def __init__(self, selection: str = "criterion", weight: float = 9.0, projections: int = 50):
        super().__init__(selection)
        if not finite_number("LaCoOT weight", weight) >= 0:
            raise OptionError(f"LaCoOT weight must be >= 0, got {weight!r}")
        self.weight, self.projections = float(weight), positive_integer("projections", projections)

    def candidates(self, gm: fx.GraphModule, model: torch.nn.Module, inputs: StepInputs) -> list[Choice]:
        if not inputs.calibration:
            raise OptionError("method 'lacoot' needs calibration batches")
        planned = planned_model(model, inputs.example_inputs)
        blocks = monitored_blocks(gm)
        distances = measured_distances(planned, blocks, inputs.calibration, self.projections)
        return [Choice(name, tuple(Decision("remove_block", add) for add in blocks[name]), distance)
                for distance, name in sorted((distance, name) for name, distance in distances.items())]

    @property
    def needs_trainer(self) -> bool:
        return self.weight > 0

    def regulariser(self, model: torch.nn.Module, example_inputs) -> BlockDistanceRegulariser | None:
        """The penalty for training the planned `model`; None at weight 0 or where no monitored block is left."""
        if self.weight == 0:
            return None
        blocks = monitored_blocks(planned_graph(model, example_inputs))
        return BlockDistanceRegulariser(model, example_inputs, self.weight, self.projections, blocks) \
            if blocks else None


class RandomOrder(Method):
    name = "random"

    def candidates(self, gm: fx.GraphModule, model: torch.nn.Module, inputs: StepInputs) -> list[Choice]:
        names = names_of_kind(gm, "activation")
        inputs.rng.shuffle(names)
        return [Choice(name, (Decision("linearize", name),), float(index)) for index, name in enumerate(names)]


class Control(Method):
    name = "control"

    def choose(self, model: torch.nn.Module, inputs: StepInputs, count: int) -> list[Choice]:
        return []

    @property
    def keeps_structure(self) -> bool:
        return True


class Pruning(Method):
    """One round of unstructured pruning per step, after collapsing the activations of zero entropy (unless
    `collapse=False`)."""

    split = "magnitude"
    default_rate = 0.5  # of the unpruned weights per round (EGP; the baseline uses the same schedule)
    options = (MethodOption("rate", None, "fraction of the unpruned weights pruned per step (0.5; dsd2 0.2)",
                            float, flag="prune-rate", bounds=(0, 1)),
               MethodOption("scope", "feeding", "the layers pruned: those feeding an activation, or all convs and "
                            "linears (magnitude only)", str, PRUNING_SCOPES, "prune-scope"),
               MethodOption("collapse", True, "linearise the activations of zero entropy before each round", bool))

    def restrict(self, pattern: str) -> None:
        raise OptionError(f"method {self.name!r} prunes weights over the whole model: option 'only' does not apply")

    def __init__(self, selection: str = "criterion", rate: float | None = None, scope: str = "feeding",
                 collapse: bool = True):
        super().__init__(selection)
        self.rate = self.default_rate if rate is None else rate
        if not 0 < self.rate < 1:
            raise OptionError(f"prune rate must be in (0, 1), got {self.rate!r}")
        if scope not in PRUNING_SCOPES:
            raise OptionError(f"prune scope must be one of {', '.join(PRUNING_SCOPES)}, got {scope!r}")
        if not isinstance(collapse, bool):
            raise OptionError(f"option 'collapse' must be a bool, got {collapse!r}")
        self.scope, self.collapse = scope, collapse
        if self.split == "egp" and scope == "all":
            raise OptionError("EGP splits the budget by the entropy of the activation each layer feeds: scope 'all' "
                              "(layers that feed none) prunes by magnitude only")

    @property
    def keeps_structure(self) -> bool:
        return not self.collapse

    def choose(self, model: torch.nn.Module, inputs: StepInputs, count: int) -> list[Choice]:
        if not inputs.calibration:
            raise OptionError(f"method {self.name!r} needs calibration batches (entropy)")
        gm = planned_graph(model, inputs.example_inputs, inputs.captured)
        _analyse(gm, ("annotate_entropy",), inputs)
        activations = [node for node in gm.graph.nodes if meta.ACTIVATION_STATS in node.meta]
        collapsible = [choice for node in activations if self.collapse
                       and (choice := collapse_choice(gm, node)) is not None]
        collapsed = self.take(gm, collapsible, len(collapsible), inputs.example_inputs)
        done = {choice.target for choice in collapsed}
        entropy = {}  # module path -> the entropy of the (first) activation it feeds
        for node in activations:
            if stable_name(node) not in done:
                for path in layer_modules(model, feeding_layers(node)):
                    entropy.setdefault(path, node.meta[meta.ACTIVATION_STATS].layer_entropy_egp)
        paths = list(entropy) if self.scope == "feeding" else layer_modules(model, nodes_of_kind(gm, "conv", "linear"))
        if not paths:
            return collapsed
        masks = self.masks(model, paths, entropy)
        return collapsed + [Choice(f"prune {self.rate:g} ({self.split})", (), math.nan, masks)]

    def masks(self, model: torch.nn.Module, paths: list[str], entropy: dict[str, float]) -> dict:
        if self.split == "magnitude":
            return global_magnitude_masks(model, paths, self.rate)
        scores, unpruned = {}, {}
        for path, layer_entropy in entropy.items():
            module = model.get_submodule(path)
            alive = effective_weight(module)[current_mask(module)]
            if layer_entropy > 0 and alive.numel():
                scores[path], unpruned[path] = layer_entropy * alive.abs().mean().item(), alive.numel()
        amounts = egp_amounts(scores, unpruned, self.rate) if scores else {}
        return layer_magnitude_masks(model, {path: int(amount) for path, amount in amounts.items()})


class Egp(Pruning):
    name = "egp"
    split = "egp"


class Magnitude(Pruning):
    name = "magnitude"


class Dsd2(Pruning):
    name = "dsd2"
    default_rate = 0.2
    distillation = (0.8, 10.0)
    options = Pruning.options + (MethodOption("pruning", "magnitude", "DSD²'s pruning split", str, PRUNING_SPLITS,
                                              "dsd2-pruning"),)

    def __init__(self, selection: str = "criterion", rate: float | None = None, scope: str = "feeding",
                 collapse: bool = True, pruning: str = "magnitude"):
        if pruning not in PRUNING_SPLITS:
            raise OptionError(f"DSD2 pruning must be one of {', '.join(PRUNING_SPLITS)}, got {pruning!r}")
        self.split = pruning
        super().__init__(selection, rate, scope, collapse)

    @property
    def pruning(self) -> str:
        return self.split


def collapse_choice(gm: fx.GraphModule, node: fx.Node) -> Choice | None:
    """Linearise an activation whose channels are each always on or always off on the calibration batches (zero
    entropy), its off channels removed or zeroed: exact on those batches. None where its entropy is not zero or
    the off channels can be neither removed nor zeroed. The upper kink of a ReLU6 is not checked."""
    stats = node.meta[meta.ACTIVATION_STATS]
    if stats.entropy.max() > 0:
        return None
    off = [channel for channel, p_on in enumerate(stats.p_on.tolist()) if p_on == 0]
    decisions = linearised_without(gm, node, off)
    return None if decisions is None else Choice(stable_name(node), decisions, 0.0)


def joint_candidates(gm: fx.GraphModule, candidates: list[Choice]) -> list[Choice]:
    """Pairs of candidates whose activations follow each other in a chain (the two activations of an inverted
    residual): together they can make a block linear. Scored by the sum of their scores."""
    by_name = {choice.target: choice for choice in candidates}
    pairs = []
    for node in gm.graph.nodes:
        first = by_name.get(stable_name(node))
        following = next_activation(node) if first is not None else None
        second = by_name.get(stable_name(following)) if following is not None else None
        if second is not None:
            pairs.append(Choice(f"{first.target}+{second.target}", first.decisions + second.decisions,
                                first.score + second.score))
    return pairs


def latency_choice(gm: fx.GraphModule, candidates: list[Choice], count: int, example_inputs,
                   limit: int = JOINT_LIMIT) -> list[Choice]:
    """The lowest-scored candidates, single or joint, that make the compressed graph cheaper: of the `limit`
    best-scored singles and every pair, those whose merges cut MACs (`compress_graph` with the exact passes and
    the cost model), best score first (a pair's score is the sum of its two), up to `count` activations; none
    where none does (`Method.choose` then takes the criterion's order)."""
    pool = sorted(candidates[:limit] + joint_candidates(gm, candidates), key=lambda choice: choice.score)
    base = _macs(gm, Plan(), example_inputs)
    saving = [choice for choice in pool if (macs := _macs(gm, Plan(choice.decisions), example_inputs)) is not None
              and macs < base]
    chosen, targets = [], set()
    for choice in saving:
        names = set(choice.target.split("+"))
        if names & targets or len(targets) + len(names) > count or \
                not applicable(gm, chosen + [choice], example_inputs):
            continue
        chosen.append(choice)
        targets |= names
    return chosen


def applicable(gm: fx.GraphModule, choices: list[Choice], example_inputs) -> bool:
    """Whether the decisions of `choices` can be applied together: always for linearisations; channel
    decisions are tried (a group whose channels one removes while another zeroes some by index cannot)."""
    decisions = tuple(d for choice in choices for d in choice.decisions)
    if all(decision.action == "linearize" for decision in decisions):
        return True
    try:
        with torch.no_grad():
            compress_graph(copy.deepcopy(gm), tuple(example_inputs), CompressConfig(), Plan(decisions),
                           exact_passes=())
    except (PlanError, PassError):
        return False
    return True


def _macs(gm: fx.GraphModule, plan: Plan, example_inputs) -> int | None:
    """MACs of `gm` compressed with `plan`; None where the plan's decisions cannot be applied together (channels
    removed from a group in which another decision zeroes channels by their former indices)."""
    try:
        with torch.no_grad():
            _, report = compress_graph(copy.deepcopy(gm), tuple(example_inputs), CompressConfig(), plan)
    except (PlanError, PassError):
        return None
    return report.after.macs


METHODS = {"easier": Easier, "tlc": Tlc, "lacoot": Lacoot, "random": RandomOrder, "control": Control, "egp": Egp,
           "magnitude": Magnitude, "dsd2": Dsd2}


def register_method(method: type[Method]) -> type[Method]:
    """Make a Method subclass available by its `name` to `prune` and `fxcompress prune` (usable as a decorator)."""
    if not (isinstance(method, type) and issubclass(method, Method)) or not method.name:
        raise OptionError(f"register_method takes a named Method subclass, got {method!r}")
    METHODS[method.name] = method
    return method


def make_method(name: str, selection: str = "criterion", options: dict | None = None) -> Method:
    """The method `name` with its `options` (`Method.options`: unknown names are an OptionError)."""
    if name not in METHODS:
        raise OptionError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    method = METHODS[name]
    valid = [option.name for option in method.options]
    unknown = sorted(set(options or {}) - set(valid))
    if unknown:
        raise OptionError(f"method {name!r} has no option {', '.join(map(repr, unknown))}; "
                          f"valid: {', '.join(valid) or 'none'}")
    return method(selection, **(options or {}))
