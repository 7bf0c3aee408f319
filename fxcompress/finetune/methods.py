"""The methods' choices, one step at a time, on the current (planned, fine-tuned) model.

Each method scores the graph of the current model with its plan applied (`planned.planned_graph`: the
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
- "random": `count` remaining activations in a seeded random order (a baseline).
- "control": nothing: the loop only fine-tunes (extra training alone improves a model).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from .. import meta
from ..config import CompressConfig
from ..context import Calibration, PassContext
from ..criteria import OFF
from ..errors import OptionError
from ..graph import names_of_kind, stable_name
from ..passes import ANALYSES
from ..plan import Decision, Plan
from ..planner import layer_error, off_decision, regions_refusal
from .planned import apply_plan, planned_graph

TLC_RANKS = ("error", "loss")


@dataclass(frozen=True)
class Choice:
    target: str  # the activation chosen
    decisions: tuple[Decision, ...]
    score: float  # the criterion's score (lower goes first); nan for random


@dataclass
class StepInputs:
    """What a method may read to choose: the example inputs, calibration batches (inputs only), one labelled
    validation batch (TLC's loss ranking) and the step's random generator."""

    example_inputs: tuple
    calibration: list
    validation_batch: tuple | None
    rng: random.Random


def _analyse(gm: fx.GraphModule, names: tuple[str, ...], inputs: StepInputs) -> None:
    calibration = Calibration(inputs.calibration, example=inputs.example_inputs) if inputs.calibration else None
    for name in names:
        ANALYSES[name](gm, PassContext(CompressConfig(), name, calibration=calibration))


class Easier:
    name = "easier"

    def choose(self, model: torch.nn.Module, inputs: StepInputs, count: int) -> list[Choice]:
        if not inputs.calibration:
            raise OptionError("method 'easier' needs calibration batches")
        gm = planned_graph(model, inputs.example_inputs)
        _analyse(gm, ("annotate_entropy",), inputs)
        scored = sorted((node.meta[meta.ACTIVATION_STATS].layer_entropy, stable_name(node))
                        for node in gm.graph.nodes if meta.ACTIVATION_STATS in node.meta)
        chosen = [pair for index, pair in enumerate(scored) if index < count or pair[0] == 0]
        return [Choice(name, (Decision("linearize", name),), entropy) for entropy, name in chosen]


class Tlc:
    name = "tlc"

    def __init__(self, rank: str = "error"):
        if rank not in TLC_RANKS:
            raise OptionError(f"TLC rank must be one of {', '.join(TLC_RANKS)}, got {rank!r}")
        self.rank = rank

    def candidates(self, model: torch.nn.Module, inputs: StepInputs) -> list[Choice]:
        gm = planned_graph(model, inputs.example_inputs)
        _analyse(gm, (("annotate_entropy",) if inputs.calibration else ()) + ("annotate_bn_state",), inputs)
        found = []
        for node in gm.graph.nodes:
            if meta.CHANNEL_STATES in node.meta:
                choice = _tlc_choice(gm, node)
                if choice is not None:
                    found.append(choice)
        return found

    def choose(self, model: torch.nn.Module, inputs: StepInputs, count: int) -> list[Choice]:
        found = self.candidates(model, inputs)
        if self.rank == "loss":
            found = [Choice(c.target, c.decisions, _loss_gap(model, c, inputs)) for c in found]
        return sorted(found, key=lambda choice: choice.score)[:count]


def _tlc_choice(gm: fx.GraphModule, node: fx.Node) -> Choice | None:
    """Linearise `node` with its off channels removed or zeroed; None where that cannot be done exactly
    (every channel off, off channels that do not output 0, no way to remove or zero them)."""
    states = node.meta[meta.CHANNEL_STATES]
    labels = states.states()
    off = [channel for channel, label in enumerate(labels) if label == OFF]
    if len(off) == len(labels) or regions_refusal(node, off) is not None:
        return None
    decisions = [Decision("linearize", stable_name(node))]
    if off:
        decision = off_decision(gm, node, off, max_error=1.0)
        if isinstance(decision, str):
            return None
        decisions.insert(0, decision)
    error = layer_error(states, "mean")
    return Choice(stable_name(node), tuple(decisions), error if math.isfinite(error) else math.inf)


def _loss_gap(model: torch.nn.Module, choice: Choice, inputs: StepInputs) -> float:
    """Loss on the validation batch with `choice` applied minus the current model's, in eval mode."""
    if inputs.validation_batch is None:
        raise OptionError("TLC's loss ranking needs a validation batch")
    *batch, labels = inputs.validation_batch

    def loss(module):
        with torch.no_grad():
            return F.cross_entropy(module.eval()(*batch), labels).item()

    return loss(apply_plan(model, Plan(choice.decisions), inputs.example_inputs)) - loss(model)


class RandomOrder:
    name = "random"

    def choose(self, model: torch.nn.Module, inputs: StepInputs, count: int) -> list[Choice]:
        remaining = names_of_kind(planned_graph(model, inputs.example_inputs), "activation")
        chosen = inputs.rng.sample(remaining, min(count, len(remaining)))
        return [Choice(name, (Decision("linearize", name),), math.nan) for name in chosen]


class Control:
    name = "control"

    def choose(self, model: torch.nn.Module, inputs: StepInputs, count: int) -> list[Choice]:
        return []


METHODS = {"easier": Easier, "tlc": Tlc, "random": RandomOrder, "control": Control}


def make_method(name: str, **options):
    if name not in METHODS:
        raise OptionError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name](**options)
