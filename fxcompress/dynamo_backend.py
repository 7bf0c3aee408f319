"""The `depthprune` torch.compile backend.

`torch.compile(model, backend="depthprune", options={...})` finds this through the
`torch_dynamo_backends` entry point. Dynamo hands over a graph whose weights are placeholders; the
backend bakes those it can merge (conv, linear and batch-norm parameters) into a copy of the graph as
constants (`capture.bake_weights`), compresses it on the path `compress` takes too
(`compiler.compress_captured`) and lowers the result.

Instance safety: dynamo reuses one graph for every instance of a class, and weights can be edited after
compilation. The backend keeps one compiled graph per set of weight tensors in use, keyed by their identity
and dropped when one of them dies, so instances sharing a graph never evict each other. At each call it
checks what can be read cheaply of every baked tensor: identity, version counter, data pointer (its old
storage is held, so that the address cannot be reused unnoticed), shape, stride, dtype and device, and
baked scalars such as a BatchNorm eps by value. This sees in-place edits (`w.mul_(2)` under no_grad,
`copy_`, optimiser steps), `w.data = t`, `torch.nn.utils.vector_to_parameters` and new instances, and the
backend compiles again, logging why (`compilations` counts the compilations of one graph).

What it cannot see cheaply: an in-place edit through `.data` or on a tensor created under
`torch.inference_mode()` (`w.data.mul_(2)`, `w.data.copy_(t)`) keeps the identity, the pointer and the
version. Inductor's freezing and TensorRT bake weights the same way. For such edits pass
`options={"check_weights": "value"}`: each call then compares every baked tensor, bit for bit, with a copy
taken when it was compiled, which costs one more copy of the baked weights in memory and a read of all of
them at every call (a device synchronisation per tensor on a GPU).
"""
from __future__ import annotations

import dataclasses
import logging
import warnings
import weakref
from typing import Callable, NamedTuple

import torch
from torch import fx

from .backends import GRAPH_LOWERINGS, lower_graph
from .capture import EXPORT_LOCK, bake_weights, scalar_placeholders, weight_placeholders
from .compiler import compress_captured
from .config import CompressConfig
from .errors import OptionError, valid_choice
from .graph import graph_inputs
from .ops import bind
from .plan import Plan
from .planner import check_max_error
from .tokens.config import TokenConfig

BACKEND_OPTIONS = {"lowering", "plan", "on_report", "tokens", "criterion", "max_error", "check_weights"}
CHECK_WEIGHTS = ("identity", "value")
DATA_FREE_CRITERIA = ("bn",)
CACHE_WARNING_SIZE = 8  # compiled variants of one graph before a warning, doubled at each

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    lowering: str
    plan: Plan
    config: CompressConfig
    on_report: Callable | None
    tokens: TokenConfig | None
    max_error: float | None  # of the data-free BatchNorm criterion, None when not asked for
    check_weights: str = "identity"


def parse_options(options: dict | None) -> BackendOptions:
    options = dict(options or {})
    valid = BACKEND_OPTIONS | CompressConfig.option_names()
    unknown = sorted(set(options) - valid)
    if unknown:
        raise OptionError(f"unknown depthprune option(s) {', '.join(map(repr, unknown))}; "
                          f"valid: {', '.join(sorted(valid))}")
    lowering = options.pop("lowering", "inductor")
    valid_choice("lowering", lowering, GRAPH_LOWERINGS)
    plan = Plan.load(options.pop("plan", None))
    on_report = options.pop("on_report", None)
    if on_report is not None and not callable(on_report):
        raise OptionError("depthprune option 'on_report' must be callable (it receives each Report)")
    tokens = options.pop("tokens", None)
    tokens = TokenConfig.from_options(tokens) if tokens is not None else None
    max_error = _criterion(options.pop("criterion", None), options.pop("max_error", None), plan)
    check_weights = options.pop("check_weights", "identity")
    valid_choice("check_weights", check_weights, CHECK_WEIGHTS)
    return BackendOptions(lowering, plan, CompressConfig.from_options(options), on_report, tokens, max_error,
                          check_weights)


def _criterion(criterion, max_error, plan: Plan) -> float | None:
    if criterion is None:
        if max_error is not None:
            raise OptionError("depthprune option 'max_error' needs criterion='bn'")
        return None
    if criterion not in DATA_FREE_CRITERIA:
        raise OptionError(f"depthprune criterion {criterion!r} is not data-free; valid: "
                          f"{', '.join(DATA_FREE_CRITERIA)} (for entropy or ot, run fxcompress.find_plan with "
                          "calibration data and pass its plan)")
    if plan.decisions:
        raise OptionError("give depthprune either a plan or a criterion, not both")
    max_error = 0.01 if max_error is None else max_error
    check_max_error(max_error)
    return float(max_error)


class WeightStamp(NamedTuple):
    """What can be read of a tensor without reading its values."""
    version: int | None  # None for tensors created under inference_mode, which have no version counter
    data_pointer: int
    shape: tuple
    stride: tuple
    dtype: torch.dtype
    device: torch.device


def stamp(tensor: torch.Tensor) -> WeightStamp:
    version = None if tensor.is_inference() else tensor._version
    return WeightStamp(version, tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype,
                       tensor.device)


def stamp_change(old: WeightStamp, new: WeightStamp) -> str | None:
    """The first field that differs, in words, or None."""
    for field, before, after in zip(WeightStamp._fields, old, new):
        if before != after:
            return f"{field.replace('_', ' ')} {before} -> {after}"
    return None


INTEGER_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (a NaN equals itself, 0.0 differs from -0.0)."""
    integer = INTEGER_OF_SIZE.get(a.element_size())
    if a.is_floating_point() and integer is not None:
        a, b = a.view(integer), b.view(integer)
    return torch.equal(a, b)


@dataclasses.dataclass
class CacheEntry:
    """One compiled graph and what it was compiled for."""
    refs: list  # weak references to the caller's weights; the entry dies with the first of them
    stamps: tuple[WeightStamp, ...]
    scalars: tuple
    storages: list  # the weights' storages, held so that no new tensor gets their data pointer
    values: list | None  # copies of the weights for check_weights="value"
    compiled: Callable


class DepthPruneCompiled:
    """The callable dynamo runs: checks the weights it baked, then calls the compiled graph.

    `cache` maps the identities of the weight tensors to a CacheEntry; `compilations` counts compilations."""

    def __init__(self, gm: fx.GraphModule, example_inputs, options: dict | None):
        self.options = parse_options(options)
        self.graph = gm
        self.weight_indices = weight_placeholders(gm, example_inputs)
        self.scalar_indices = scalar_placeholders(gm, example_inputs)
        baked = set(self.weight_indices) | set(self.scalar_indices)
        self.runtime_indices = [i for i in range(len(example_inputs)) if i not in baked]
        self.input_names = [node.name for node in graph_inputs(gm)]
        self.cache: dict[tuple[int, ...], CacheEntry] = {}
        self.compilations = 0
        self._warn_at = CACHE_WARNING_SIZE
        self._compile(example_inputs, "first call")

    def _stale(self, entry: CacheEntry | None, args) -> str | None:
        """Why `entry` cannot run `args`, or None when it can."""
        weights = [args[i] for i in self.weight_indices]
        if entry is None or any(ref() is not weight for ref, weight in zip(entry.refs, weights)):
            return "new weight tensors (another instance of the module, or new parameters)"
        for index, old, weight in zip(self.weight_indices, entry.stamps, weights):
            change = stamp_change(old, stamp(weight))
            if change is not None:
                return f"weights edited: {self.input_names[index]} {change}"
        for index, old in zip(self.scalar_indices, entry.scalars):
            if args[index].item() != old:
                return f"weights edited: {self.input_names[index]} {old} -> {args[index].item()}"
        if entry.values is not None:
            for index, old, weight in zip(self.weight_indices, entry.values, weights):
                if not same_bits(old, weight):
                    return f"weights edited: values of {self.input_names[index]} changed"
        return None

    def _compile(self, args, reason: str):
        logger.log(logging.WARNING if reason.startswith("weights edited") else logging.INFO,
                   "depthprune compiles a graph with %d inputs: %s", len(args), reason)
        baked = bake_weights(self.graph, args, self.weight_indices, self.scalar_indices)
        runtime_args = [args[i] for i in self.runtime_indices]
        options = self.options
        config = options.config
        if any(not isinstance(arg, torch.Tensor) for arg in runtime_args):  # sizes passed: dynamic shapes
            config = dataclasses.replace(config, allow_bias_map=False)
        criterion = None if options.max_error is None else "bn"  # the one data-free criterion
        compressed, report, _ = compress_captured(baked, runtime_args, config, options.plan, tokens=options.tokens,
                                                  criterion=criterion, planner={"max_error": options.max_error})
        if options.on_report is not None:
            options.on_report(report)
        compiled = lower_graph(compressed, runtime_args, options.lowering)
        self.compilations += 1
        self._remember(args, compiled)
        return compiled

    def _remember(self, args, compiled) -> None:
        weights = [args[i] for i in self.weight_indices]
        key = tuple(map(id, weights))
        values = [weight.detach().clone() for weight in weights] if self.options.check_weights == "value" else None
        self.cache[key] = CacheEntry(self._watch(key, weights), tuple(map(stamp, weights)),
                                     tuple(args[i].item() for i in self.scalar_indices),
                                     [weight.untyped_storage() for weight in weights], values, compiled)
        if len(self.cache) >= self._warn_at:
            warnings.warn(f"depthprune holds {len(self.cache)} compiled variants of one graph, one per set of "
                          "weights in use, each with its own copy of the weights")
            self._warn_at *= 2

    def _watch(self, key: tuple, weights: list) -> list:
        """Weak references that drop the entry at `key` when one of `weights` dies."""
        owner = weakref.ref(self)

        def forget(_):
            compiled = owner()
            if compiled is not None:
                compiled.cache.pop(key, None)

        return [weakref.ref(weight, forget) for weight in weights]

    def __call__(self, *args):
        entry = self.cache.get(tuple(id(args[i]) for i in self.weight_indices))
        reason = self._stale(entry, args)
        if reason is None:
            compiled = entry.compiled
        else:
            with EXPORT_LOCK:  # compiling again at call time: one at a time, never beside an export or dynamo
                compiled = self._compile(args, reason)
        return compiled(*[args[i] for i in self.runtime_indices])


def trains(gm: fx.GraphModule, example_inputs) -> bool:
    """Whether the graph trains: gradients enabled, parameters that want them, and a BatchNorm or dropout in
    training mode (a model in train mode). Baking its weights would leave them without gradients."""
    if not torch.is_grad_enabled() or not any(isinstance(value, torch.Tensor) and value.requires_grad
                                              for value in example_inputs):
        return False
    for node in gm.graph.nodes:
        call = bind(node)
        if call is not None and call.kind in ("batch_norm", "dropout") and \
                call.args.get("training", call.args.get("train")) is not False:
            return True
    return False


def depthprune(gm: fx.GraphModule, example_inputs, options: dict | None = None):
    """The torch.compile backend function (registered as "depthprune"). A graph that trains runs as dynamo
    captured it, uncompressed, with a warning: depthprune is an inference compiler."""
    if not isinstance(options, (dict, type(None))):
        raise OptionError(f"depthprune options must be a dict, got {type(options).__name__}")
    parse_options(options)
    if trains(gm, example_inputs):
        warnings.warn("depthprune compiles models for inference, but this one is in training mode with gradients "
                      "enabled: it runs uncompressed, so that every parameter gets its gradient; call model.eval() "
                      "(and run it under torch.no_grad()) to compress it")
        return gm.forward
    return DepthPruneCompiled(gm, list(example_inputs), options)
