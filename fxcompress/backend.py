"""The `depthprune` torch.compile backend.

`torch.compile(model, backend="depthprune", options={...})` finds this through the
`torch_dynamo_backends` entry point. Dynamo hands over a graph whose weights are placeholders; the
backend bakes those it can merge (conv, linear and batch-norm parameters) into a copy of the graph as
constants, runs the pass pipeline and lowers the result.

Instance safety: dynamo reuses one graph for every instance of a class, and weights can be edited in
place after compilation. At each call the backend checks that the tensors in the baked positions are the
very objects it baked, at the same version counter (and baked scalars such as a BatchNorm eps have the
same value), and compiles again otherwise (a small cache keeps one compiled graph per set of weights).
"""
from __future__ import annotations

import dataclasses
import weakref
from collections import OrderedDict

import torch
from torch import fx

from .backends import LOWERINGS, lower_graph
from .config import CompressConfig
from .errors import OptionError, valid_choice
from .graph import is_guard
from .ops import bind
from .pipeline import compress_graph
from .plan import Plan

BACKEND_OPTIONS = {"lowering", "plan", "on_report"}
WEIGHT_PARAMS = {"weight", "bias", "running_mean", "running_var", "bias_map"}
CACHE_SIZE = 4


def parse_options(options: dict | None) -> tuple[str, Plan, CompressConfig, object]:
    options = dict(options or {})
    valid = BACKEND_OPTIONS | CompressConfig.option_names()
    unknown = sorted(set(options) - valid)
    if unknown:
        raise OptionError(f"unknown depthprune option(s) {', '.join(map(repr, unknown))}; "
                          f"valid: {', '.join(sorted(valid))}")
    lowering = options.pop("lowering", "inductor")
    valid_choice("lowering", lowering, LOWERINGS)
    plan = Plan.load(options.pop("plan", None))
    on_report = options.pop("on_report", None)
    if on_report is not None and not callable(on_report):
        raise OptionError("depthprune option 'on_report' must be callable (it receives each Report)")
    return lowering, plan, CompressConfig.from_options(options), on_report


def weight_placeholders(gm: fx.GraphModule, example_inputs) -> list[int]:
    """Indices of placeholders used only as weights, biases or statistics of ops the passes rewrite."""
    indices = []
    for index, (node, value) in enumerate(zip(_placeholders(gm), example_inputs)):
        uses = [user for user in node.users if not is_guard(user)]
        if isinstance(value, torch.Tensor) and uses and all(_is_weight_use(user, node) for user in uses):
            indices.append(index)
    return indices


def scalar_placeholders(gm: fx.GraphModule, example_inputs) -> list[int]:
    """Indices of 0-d tensors read only through `.item()`: module attributes such as a BatchNorm eps or a
    dropout probability, which dynamo passes as inputs when compiling with dynamic=True."""
    indices = []
    for index, (node, value) in enumerate(zip(_placeholders(gm), example_inputs)):
        if isinstance(value, torch.Tensor) and value.dim() == 0 and node.users and \
                all(user.op == "call_method" and user.target == "item" for user in node.users):
            indices.append(index)
    return indices


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [node for node in gm.graph.nodes if node.op == "placeholder"]


def _is_weight_use(user: fx.Node, value: fx.Node) -> bool:
    call = bind(user)
    if call is None or call.kind not in ("conv", "linear", "batch_norm"):
        return False
    return any(arg is value for name, arg in call.args.items() if name in WEIGHT_PARAMS) and \
        call.args.get("input") is not value


def bake_weights(gm: fx.GraphModule, example_inputs, weights: list[int], scalars: list[int] = ()
                 ) -> fx.GraphModule:
    """A copy of `gm` in which the placeholders at `weights` are constants holding copies of those tensors
    and the `.item()` reads of the placeholders at `scalars` are their values."""
    baked = fx.GraphModule(torch.nn.Module(), fx.Graph())
    env: dict[fx.Node, object] = {}
    for index, node in enumerate(_placeholders(gm)):
        if index in weights:
            name = f"baked_{node.name}"
            baked.register_buffer(name, example_inputs[index].detach().clone())
            env[node] = baked.graph.get_attr(name)
        elif index in scalars:
            for item in node.users:
                env[item] = example_inputs[index].item()
        else:
            env[node] = baked.graph.node_copy(node, lambda n: env[n])
    for node in gm.graph.nodes:
        if node.op != "placeholder" and node not in env:
            env[node] = baked.graph.node_copy(node, lambda n: env[n])
    baked.recompile()
    return baked


class DepthPruneCompiled:
    """The callable dynamo runs: checks the weights it baked, then calls the compiled graph."""

    def __init__(self, gm: fx.GraphModule, example_inputs, options: dict | None):
        self.lowering, self.plan, self.config, self.on_report = parse_options(options)
        self.graph = gm
        self.weight_indices = weight_placeholders(gm, example_inputs)
        self.scalar_indices = scalar_placeholders(gm, example_inputs)
        baked = set(self.weight_indices) | set(self.scalar_indices)
        self.runtime_indices = [i for i in range(len(example_inputs)) if i not in baked]
        self.cache: OrderedDict = OrderedDict()
        self._compile(example_inputs)

    def _key(self, args) -> tuple:
        weights = tuple((id(args[i]), args[i]._version) for i in self.weight_indices)
        return weights + tuple(args[i].item() for i in self.scalar_indices)

    def _compile(self, args):
        baked = bake_weights(self.graph, args, self.weight_indices, self.scalar_indices)
        runtime_args = [args[i] for i in self.runtime_indices]
        config = self.config
        if any(not isinstance(arg, torch.Tensor) for arg in runtime_args):  # sizes passed: dynamic shapes
            config = dataclasses.replace(config, allow_bias_map=False)
        with torch.no_grad():
            compressed, report = compress_graph(baked, runtime_args, config, self.plan)
        if self.on_report is not None:
            self.on_report(report)
        compiled = lower_graph(compressed, runtime_args, self.lowering)
        refs = [weakref.ref(args[i]) for i in self.weight_indices]
        self.cache[self._key(args)] = (refs, compiled)
        while len(self.cache) > CACHE_SIZE:
            self.cache.popitem(last=False)
        return compiled

    def __call__(self, *args):
        entry = self.cache.get(self._key(args))
        if entry is not None and all(ref() is args[i] for ref, i in zip(entry[0], self.weight_indices)):
            compiled = entry[1]
        else:
            compiled = self._compile(args)
        return compiled(*[args[i] for i in self.runtime_indices])


def depthprune(gm: fx.GraphModule, example_inputs, options: dict | None = None):
    """The torch.compile backend function (registered as "depthprune")."""
    if not isinstance(options, (dict, type(None))):
        raise OptionError(f"depthprune options must be a dict, got {type(options).__name__}")
    return DepthPruneCompiled(gm, list(example_inputs), options)
