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
from typing import Callable

import torch
from torch import fx

from .backends import GRAPH_LOWERINGS, lower_graph
from .config import CompressConfig
from .errors import OptionError, valid_choice
from .graph import annotate_names, annotate_shapes, graph_inputs, is_guard, writes_in_place
from .ops import bind
from .pipeline import compress_graph
from .plan import Plan
from .planner import plan_graph
from .tokens.config import TokenConfig
from .tokens.graph import token_plan

BACKEND_OPTIONS = {"lowering", "plan", "on_report", "tokens", "criterion", "max_error"}
DATA_FREE_CRITERIA = ("bn",)
WEIGHT_PARAMS = {"weight", "bias", "running_mean", "running_var", "bias_map"}
CACHE_SIZE = 4


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    lowering: str
    plan: Plan
    config: CompressConfig
    on_report: Callable | None
    tokens: TokenConfig | None
    max_error: float | None  # of the data-free BatchNorm criterion, None when not asked for


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
    return BackendOptions(lowering, plan, CompressConfig.from_options(options), on_report, tokens, max_error)


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
    if isinstance(max_error, bool) or not isinstance(max_error, (int, float)) or not 0 <= max_error < 1:
        raise OptionError(f"depthprune option 'max_error' must be a number in [0, 1), got {max_error!r}")
    return float(max_error)


def weight_placeholders(gm: fx.GraphModule, example_inputs) -> list[int]:
    """Indices of placeholders used only as weights, biases or statistics of ops the passes rewrite, directly
    or through ops that compute a weight from them (a prune mask, weight_norm: `fold_constants` folds those)."""
    indices = []
    for index, (node, value) in enumerate(zip(graph_inputs(gm), example_inputs)):
        uses = [user for user in node.users if not is_guard(user)]
        if isinstance(value, torch.Tensor) and uses and all(_is_weight_use(user, node) for user in uses):
            indices.append(index)
    return indices


def scalar_placeholders(gm: fx.GraphModule, example_inputs) -> list[int]:
    """Indices of 0-d tensors read only through `.item()`: module attributes such as a BatchNorm eps or a
    dropout probability, which dynamo passes as inputs when compiling with dynamic=True."""
    indices = []
    for index, (node, value) in enumerate(zip(graph_inputs(gm), example_inputs)):
        if isinstance(value, torch.Tensor) and value.dim() == 0 and node.users and \
                all(user.op == "call_method" and user.target == "item" for user in node.users):
            indices.append(index)
    return indices


def _is_weight_use(user: fx.Node, value: fx.Node) -> bool:
    call = bind(user)
    if call is None or call.kind not in ("conv", "linear", "batch_norm"):
        return _is_derived_weight(user)
    if call.kind == "batch_norm" and call["training"] is not False:
        return False  # training mode updates the running statistics in place: they must stay the caller's
    return any(arg is value for name, arg in call.args.items() if name in WEIGHT_PARAMS) and \
        call.args.get("input") is not value


def _is_derived_weight(node: fx.Node) -> bool:
    """Whether `node` computes a weight from weights (weight_orig * weight_mask of a pruned conv, a
    weight_norm): no in-place write, and every use a weight use or the graph output (where dynamo returns
    the weight that a forward pre-hook stores on the module)."""
    if node.op not in ("call_function", "call_method") or writes_in_place(node):
        return False
    uses = [user for user in node.users if not is_guard(user)]
    return bool(uses) and all(user.op == "output" or _is_weight_use(user, node) for user in uses)


def bake_weights(gm: fx.GraphModule, example_inputs, weights: list[int], scalars: list[int] = ()
                 ) -> fx.GraphModule:
    """A copy of `gm` in which the placeholders at `weights` are constants holding copies of those tensors
    and the `.item()` reads of the placeholders at `scalars` are their values."""
    baked = fx.GraphModule(torch.nn.Module(), fx.Graph())
    env: dict[fx.Node, object] = {}
    for index, node in enumerate(graph_inputs(gm)):
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
        self.options = parse_options(options)
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
        config = self.options.config
        if any(not isinstance(arg, torch.Tensor) for arg in runtime_args):  # sizes passed: dynamic shapes
            config = dataclasses.replace(config, allow_bias_map=False)
        with torch.no_grad():
            compressed, report = compress_graph(baked, runtime_args, config, self._plan(baked, runtime_args))
        if self.options.on_report is not None:
            self.options.on_report(report)
        compiled = lower_graph(compressed, runtime_args, self.options.lowering)
        refs = [weakref.ref(args[i]) for i in self.weight_indices]
        self.cache[self._key(args)] = (refs, compiled)
        while len(self.cache) > CACHE_SIZE:
            self.cache.popitem(last=False)
        return compiled

    def _plan(self, baked: fx.GraphModule, runtime_args) -> Plan:
        """The given plan plus the token reductions and the data-free BatchNorm criterion (TLC) decisions
        asked for, found on this graph."""
        options, decisions = self.options, list(self.options.plan.decisions)
        tokens = None if options.tokens is None or options.tokens.is_identity else options.tokens
        if tokens is None and options.max_error is None:
            return options.plan
        annotate_names(baked)
        annotate_shapes(baked, runtime_args)
        if tokens is not None:
            decisions += token_plan(baked, tokens).decisions
        if options.max_error is not None:
            decisions += plan_graph(baked, runtime_args, criterion="bn", max_error=options.max_error,
                                    config=options.config).plan.decisions
        return Plan(tuple(decisions), options.plan.model)

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
