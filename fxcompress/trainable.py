"""Plans on a trainable model: `apply_plan(model, plan, example_inputs)`.

The result is a deep copy of the caller's model, of a subclass of its class, with the same modules,
parameters and state_dict keys. Its forward runs the original forward under a `TorchFunctionMode` that
names every call of an activation, add, conv or linear as the compiler does (`<innermost module path>:<op>[#k]`,
the k-th such call in that module: `graph.annotate_names`) and edits the planned call sites:
- linearize: the activation returns its input (a module called at several sites, such as torchvision
  ResNet's `relu`, is linearised only at the planned one);
- zero_channels: the activation's input is zeroed on the channels first (the compiler zeroes the BatchNorm or
  conv that feeds it: the same output);
- remove_channels: the inputs of every conv and linear reading the channel group are zeroed on its channels
  (what the structural removal computes; `compress` removes them);
- remove_block: the residual add returns (a copy of) its shortcut; the body still runs, unused, so
  DistributedDataParallel needs `find_unused_parameters=True`.
`blending(model, since)` blends the edits that `since` does not make in, from the original calls to the edited
ones, with a weight the caller raises to 1 (gradual linearisation, as VanillaNet and DepthShrinker anneal theirs).
`recording(model, names)` records, while it is open, (name, shortcut operand, result) of the named residual adds
at each forward, with their gradients (LaCoOT's regulariser reads block inputs and outputs this way, for any
architecture, without module hooks).
BatchNorm and dropout keep their train/eval behaviour, and every parameter stays an ordinary parameter.
Each application is verified: in eval mode the planned copy must match the captured graph with the plan
applied on seeded samples, and the call sites it saw must be the graph's. The copy carries its plan:
`apply_plan` again adds decisions on top, and `compress` compresses its base with the plan (exporting
through the mode would trace the edits wrongly, so `capture` refuses a planned model). Save a planned
model as its `state_dict()` and its plan: its class is made at run time.
"""
from __future__ import annotations

import copy
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import fx
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode

from .blocks import ChannelGroup, channel_group, residual_block
from .capture import capture, check_inputs, is_planned, private_copy
from .config import CompressConfig
from .errors import PlanError
from .graph import annotate_names, annotate_shapes, channel_axis, module_of, names_of_kind, stable_name
from .ops import bind, python_ops, spec_of
from .pipeline import check_plan, compress_graph
from . import meta
from .plan import Plan
from .verify import fresh, full_precision, output_tensors, relative_error, sample_inputs

_EDITS, _EXAMPLE = "_fxcompress_edits", "_fxcompress_example"  # beside meta.PLAN in a planned model's __dict__
TOLERANCE = 1e-4  # relative: the planned copy against the graph with the plan applied, in float32

_KINDS = ("activation", "add", "conv", "linear")
_METHODS = {torch.Tensor.relu: ("activation", "relu"), torch.Tensor.relu_: ("activation", "relu"),
            torch.Tensor.__add__: ("add", "add"), torch.Tensor.__radd__: ("add", "add"),
            torch.Tensor.__iadd__: ("add", "add"), torch.Tensor.add: ("add", "add"),
            torch.Tensor.add_: ("add", "add")}
_RUNTIME_OPS = {**{func: (spec.kind, spec.name) for func, spec in python_ops(_KINDS).items()}, **_METHODS}
_IN_PLACE = (torch.relu_, torch.Tensor.relu_)


@dataclass
class SiteEdit:
    """What a planned model does at one call site."""

    linearize: bool = False
    zero: tuple[int, tuple[int, ...]] | None = None  # (axis, channels) zeroed in the activation's input
    mask_input: tuple[int, tuple[int, ...]] | None = None  # (axis, channels) zeroed in a conv/linear input
    shortcut: int | None = None  # the operand of a residual add that it returns


@dataclass
class _Edits:
    sites: dict[str, SiteEdit] = field(default_factory=dict)
    kinds: frozenset[str] = frozenset()  # the op kinds whose call sites the plan edits
    shortcuts: dict[str, int] = field(default_factory=dict)  # residual add -> the index of its shortcut operand
    watched: frozenset[str] = frozenset()  # residual adds whose calls are recorded (`recording`)
    recorded: list = field(default_factory=list)  # (add, shortcut operand, result) of the watched calls
    blended: frozenset[str] = frozenset()  # sites whose edit is blended in (`blending`), with weight `blend`
    blend: float = 1.0

    def at(self, name: str) -> SiteEdit:
        return self.sites.setdefault(name, SiteEdit())


def _zeroed(tensor: torch.Tensor, where: tuple[int, tuple[int, ...]], in_place: bool) -> torch.Tensor:
    axis, channels = where
    index = torch.tensor(channels, device=tensor.device)
    return tensor.index_fill_(axis, index, 0) if in_place else tensor.index_fill(axis, index, 0)


def _in_place(func, args, kwargs, spec_params: tuple[str, ...]) -> bool:
    if func in _IN_PLACE:
        return True
    bound = dict(zip(spec_params, args), **kwargs)
    return bool(bound.get("inplace", False))


class _CallSites(TorchFunctionMode):
    """Names each call of a `_RUNTIME_OPS` op as the compiler does and applies `edits` at the named sites;
    `seen` lists the names, in call order, of the kinds the edits touch."""

    def __init__(self, model: torch.nn.Module, edits: _Edits):
        super().__init__()
        self.paths = {id(module): path for path, module in model.named_modules()}
        self.edits, self.stack, self.count, self.seen = edits, [], Counter(), []
        self.handles, self.watched_calls = [], set()

    def __enter__(self):
        self.handles = [register_module_forward_pre_hook(self._enter_module),
                        register_module_forward_hook(self._exit_module, always_call=True)]
        return super().__enter__()

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        return super().__exit__(*exc)

    def _enter_module(self, module, args):
        if id(module) in self.paths:
            self.stack.append(self.paths[id(module)])

    def _exit_module(self, module, args, output):
        if id(module) in self.paths:
            self.stack.pop()

    def _name(self, op: str) -> str:
        key = f"{self.stack[-1] if self.stack and self.stack[-1] else 'root'}:{op}"
        count = self.count[key]
        self.count[key] += 1
        return key if count == 0 else f"{key}#{count}"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = _RUNTIME_OPS.get(func)
        if op is None:
            return func(*args, **kwargs)
        kind, name = op
        site = self._name(name)
        if kind in self.edits.kinds:
            self.seen.append(site)
        edit = self.edits.sites.get(site)
        if site in self.edits.watched:
            return self._recorded_call(site, func, args, kwargs)
        if edit is None:
            return func(*args, **kwargs)
        if site in self.edits.blended and self.edits.blend < 1:
            return _blended_call(func, args, kwargs, edit, self.edits.blend)
        return _edited_call(func, args, kwargs, edit)

    def _recorded_call(self, site: str, func, args, kwargs):
        """The add, computed as it is, with copies of its shortcut operand (taken before: an in-place add may
        write into it) and of its result (a following in-place activation may overwrite it) recorded."""
        shortcut = args[self.edits.shortcuts[site]].clone()
        result = func(*args, **kwargs)
        self.edits.recorded.append((site, shortcut, result.clone()))
        self.watched_calls.add(site)
        return result

    def check_watched(self) -> None:
        """Refuse a forward that did not call every watched add (its names are not this model's call sites)."""
        missing = sorted(self.edits.watched - self.watched_calls)
        if missing:
            raise PlanError(f"recording: the watched residual adds {missing[:3]} were not called in the forward "
                            "(this model's calls do not match its graph's op names)")


def _edited_call(func, args, kwargs, edit: SiteEdit):
    params = spec.params if (spec := spec_of(func)) is not None else ("input",)
    in_place = _in_place(func, args, kwargs, params)
    if edit.shortcut is not None:
        return args[edit.shortcut].clone()
    first, rest = args[0], args[1:]
    if edit.mask_input is not None:
        first = _zeroed(first, edit.mask_input, in_place=False)
    if edit.zero is not None:
        first = _zeroed(first, edit.zero, in_place)
    if edit.linearize:
        return first if in_place else first.clone()
    return func(first, *rest, **kwargs)


def _blended_call(func, args, kwargs, edit: SiteEdit, weight: float):
    """weight * the edited call + (1 - weight) * the original call, the edited one on a copy of an in-place op's
    input (the original writes into it)."""
    params = spec.params if (spec := spec_of(func)) is not None else ("input",)
    edited_args = (args[0].clone(), *args[1:]) if _in_place(func, args, kwargs, params) else args
    edited = _edited_call(func, edited_args, kwargs, edit)
    return weight * edited + (1 - weight) * func(*args, **kwargs)


def _planned_forward(base: type):
    def forward(self, *args, **kwargs):
        with _CallSites(self, self.__dict__[_EDITS]) as sites:
            output = base.forward(self, *args, **kwargs)
        sites.check_watched()
        return output
    return forward


_PLANNED_CLASSES: dict[type, type] = {}


def _planned_class(base: type) -> type:
    if base not in _PLANNED_CLASSES:
        _PLANNED_CLASSES[base] = type(f"Planned{base.__name__}", (base,),
                                      {"forward": _planned_forward(base), "__reduce__": _reduce_planned,
                                       "__deepcopy__": _deepcopy_planned, "__module__": base.__module__})
    return _PLANNED_CLASSES[base]


def plan_of(model: torch.nn.Module) -> Plan:
    """The plan a model made by `apply_plan` carries; an empty plan for any other model."""
    return model.__dict__.get(meta.PLAN, Plan())


def base_of(model: torch.nn.Module) -> torch.nn.Module:
    """A planned model seen as its original class, sharing its modules and parameters (a shallow copy); any
    other model itself."""
    if not is_planned(model):
        return model
    cls = type(model).__mro__[1]
    base = cls.__new__(cls)
    base.__dict__.update({key: value for key, value in model.__dict__.items()
                          if key not in (meta.PLAN, _EDITS, _EXAMPLE)})
    return base


def split_plan(model: torch.nn.Module, plan: Plan) -> tuple[torch.nn.Module, Plan]:
    """`base_of(model)` and the plan it is to be compiled with: the model's own plan, then `plan`."""
    base = base_of(model)
    return base, Plan(plan_of(model).decisions + plan.decisions, plan_of(model).model or type(base).__name__)


def _edits(gm: fx.GraphModule, plan: Plan) -> _Edits:
    nodes = {stable_name(node): node for node in gm.graph.nodes}
    edits, kinds, group = _Edits(), set(), ChannelGroup()
    for decision in plan.decisions:
        node = nodes[decision.target]
        if decision.action == "linearize":
            edits.at(decision.target).linearize = True
        elif decision.action == "zero_channels":
            axis = channel_axis(bind(node)["input"])
            edits.at(decision.target).zero = (axis, tuple(decision.params["channels"]))
        elif decision.action == "remove_channels":
            found = channel_group(gm, node, decision.params["channels"])
            if not found:
                raise decision.error(f"cannot remove channels: {found}")
            group.merge(found)
        elif decision.action == "remove_block":
            block = residual_block(node)
            if not block:
                raise decision.error(f"cannot remove the block: {block}")
            edits.at(decision.target).shortcut = _shortcut_index(node, block)
        else:
            raise decision.error("this action cannot be applied to a trainable model")
        kinds.add(bind(node).kind)
    for consumer, channels in group.consumers.items():
        source = bind(consumer)["input"]
        edits.at(stable_name(consumer)).mask_input = (channel_axis(source), tuple(sorted(channels)))
        kinds.add(bind(consumer).kind)
    edits.kinds = frozenset(kinds)
    edits.shortcuts = {stable_name(node): _shortcut_index(node, block) for node in gm.graph.nodes
                       if (block := residual_block(node))}
    return edits


def _shortcut_index(add: fx.Node, block: tuple) -> int:
    call = bind(add)
    return [call["input"], call["other"]].index(block[1])


@contextmanager
def recording(model: torch.nn.Module, names) -> Iterator[list]:
    """While open, each forward of the planned `model` (also through DistributedDataParallel, in train or eval
    mode) appends (name, shortcut operand, result) for each residual add in `names` to the list it yields, with
    gradients where grad is enabled; copies, so later in-place ops do not change them. The consumer clears the
    list. Raises PlanError for a model not made by `apply_plan`, a name that is not one of its residual adds
    (`blocks.residual_block`) or a removed block (its add returns the shortcut and its body runs unused), and at
    the end of a forward that did not call every named add."""
    if not is_planned(model):
        raise PlanError("recording needs a planned model (made by apply_plan)")
    edits = model.__dict__[_EDITS]
    names = frozenset(names)
    unknown = sorted(names - edits.shortcuts.keys())
    if unknown:
        raise PlanError(f"recording: {unknown[:3]} are not residual adds of this model; "
                        f"valid: {', '.join(sorted(edits.shortcuts)) or 'none'}")
    removed = sorted(name for name in names if name in edits.sites and edits.sites[name].shortcut is not None)
    if removed:
        raise PlanError(f"recording: the blocks {removed[:3]} are removed by the model's plan")
    if edits.watched:
        raise PlanError("recording: this model is already being recorded")
    edits.watched, edits.recorded = names, []
    try:
        yield edits.recorded
    finally:
        edits.watched, edits.recorded = frozenset(), []


@contextmanager
def blending(model: torch.nn.Module, since: torch.nn.Module) -> Iterator[Callable[[float], None]]:
    """While open, the edits of the planned `model` that `since` (the model it was planned from) does not make are
    blended in: each such call site returns weight * its edited result + (1 - weight) * its original one, the
    weight set by the function this yields (0 at first: the original model). On exit every edit is whole again
    (weight 1: exactly the plan), so annealing from 0 to 1 ends at the planned model, which merges exactly."""
    if not is_planned(model):
        raise PlanError("blending needs a planned model (made by apply_plan)")
    edits = model.__dict__[_EDITS]
    before = since.__dict__[_EDITS].sites if is_planned(since) else {}
    edits.blended = frozenset(name for name, edit in edits.sites.items() if before.get(name) != edit)

    def set_weight(weight: float) -> None:
        edits.blend = min(1.0, max(0.0, float(weight)))

    set_weight(0.0)
    try:
        yield set_weight
    finally:
        edits.blended, edits.blend = frozenset(), 1.0


class EvalMode:
    """Puts a model in eval mode for a block and gives every module its own mode back afterwards."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.modes = model, {}

    def __enter__(self):
        self.modes = {module: module.training for module in self.model.modules()}
        self.model.eval()

    def __exit__(self, *exc):
        for module, training in self.modes.items():
            module.training = training


def base_graph(model: torch.nn.Module, example_inputs) -> fx.GraphModule:
    """The captured graph of `model` (a planned model: of its base, without its plan), names and shapes
    annotated. Captured once, it serves `planned_graph` and `apply_plan` (`captured=`) while the base's
    weights stay as they were: the fine-tuning loop captures once per step, for scoring and applying."""
    base = base_of(model)
    with EvalMode(base), torch.no_grad():
        gm = capture(base, check_inputs(base, example_inputs))
    annotate_names(gm)
    annotate_shapes(gm, tuple(example_inputs))
    return gm


def _holds_weights_of(gm: fx.GraphModule, base: torch.nn.Module) -> bool:
    """Whether `gm` holds every parameter of `base`, by name, equal, and its buffers where it holds them."""
    graph_state, parameters = gm.state_dict(), dict(base.named_parameters())
    return set(parameters) <= set(graph_state) and all(
        torch.equal(graph_state[key], value) for key, value in (*parameters.items(), *base.named_buffers())
        if key in graph_state)


def _captured(model: torch.nn.Module, example_inputs, plan: Plan,
              captured: fx.GraphModule | None = None) -> fx.GraphModule:
    """The captured graph of `model` (a planned model: of its base), names and shapes annotated, with
    `fxcompress_plan`: the model's plan then `plan`, checked against it (PlanError). A copy of `captured`
    (`base_graph` of the same base) where it holds the base's current weights, else captured anew."""
    base, full = split_plan(model, plan)
    reuse = captured is not None and _holds_weights_of(captured, base)
    gm = copy.deepcopy(captured) if reuse else base_graph(base, example_inputs)
    check_plan(gm, full)
    gm.fxcompress_plan = full
    return gm


def planned_graph(model: torch.nn.Module, example_inputs, captured: fx.GraphModule | None = None
                  ) -> fx.GraphModule:
    """The graph of a planned model, as the compiler sees it: captured from its base (or `captured`, see
    `base_graph`), its plan applied, no merge; stable names and shapes annotated (what the methods score)."""
    gm = _captured(model, tuple(example_inputs), Plan(), captured)
    gm, _ = compress_graph(gm, tuple(example_inputs), CompressConfig(), gm.fxcompress_plan, exact_passes=())
    return gm


def apply_plan(model: torch.nn.Module, plan: Plan | str | dict, example_inputs,
               captured: fx.GraphModule | None = None) -> torch.nn.Module:
    """A trainable copy of `model` with `plan` applied at its call sites (see the module docstring); `model`
    may itself be planned, and the copy then carries both plans. `example_inputs` are used to find and check
    the call sites; `captured` (`base_graph`) saves capturing the model again. Raises PlanError where the plan
    does not fit the model or cannot be applied at call time.
    """
    plan = Plan.load(plan)
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    gm = _captured(model, example_inputs, plan, captured)
    full = gm.fxcompress_plan
    edits = _edits(gm, full)
    planned = private_copy(base_of(model))
    planned.__class__ = _planned_class(type(planned))
    planned.__dict__[meta.PLAN] = full
    planned.__dict__[_EDITS] = edits
    planned.__dict__[_EXAMPLE] = tuple(t.detach().clone() if isinstance(t, torch.Tensor) else t
                                       for t in example_inputs)
    _verify(planned, gm, example_inputs)
    return planned


def _reduce_planned(model: torch.nn.Module):
    """Pickle a planned model as its base model (its class must be importable where it is loaded), its plan and
    its example inputs: loading applies the plan again (`apply_plan`), checked as on the first application."""
    return _restore_planned, (private_copy(base_of(model)), plan_of(model).to_dict(), model.__dict__[_EXAMPLE])


def _deepcopy_planned(model: torch.nn.Module, memo: dict) -> torch.nn.Module:
    """A deep copy as of any module (pickling, through `_reduce_planned`, would apply the plan again)."""
    copied = type(model).__new__(type(model))
    memo[id(model)] = copied
    copied.__dict__.update(copy.deepcopy(model.__dict__, memo))
    return copied


def _restore_planned(base: torch.nn.Module, plan: dict, example_inputs: tuple) -> torch.nn.Module:
    training = base.training
    planned = apply_plan(base.eval(), Plan.from_dict(plan), example_inputs)
    return planned.train(training)


def _visible(graph_sites: list[str], seen: list[str], edited) -> list[str]:
    """The graph's call sites that the call-time mode can see: all but those of a module none of whose calls is
    seen, nor edited (torch's multi-head attention calls its linears inside one overridable function, which the
    mode sees as a whole: their numbering cannot shift the other sites', and the outputs are still compared)."""
    called = {module_of(site) for site in (*seen, *edited)}
    return [site for site in graph_sites if module_of(site) in called]


@full_precision()
def _verify(planned: torch.nn.Module, gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Refuse a planned copy whose call sites or eval-mode outputs differ from the graph with the plan."""
    reference_gm, _ = compress_graph(copy.deepcopy(gm), example_inputs, CompressConfig(), gm.fxcompress_plan,
                                     exact_passes=())
    samples = sample_inputs(example_inputs)
    expected = [output_tensors(reference_gm(*fresh(sample))) for sample in samples]
    actual = []
    with EvalMode(planned), torch.no_grad():
        for sample in samples:
            sites = _CallSites(planned, planned.__dict__[_EDITS])
            with sites:
                actual.append(output_tensors(type(planned).__mro__[1].forward(planned, *fresh(sample))))
            seen = sorted(sites.seen)
    graph_sites = _visible(sorted(names_of_kind(gm, *planned.__dict__[_EDITS].kinds)), seen,
                           planned.__dict__[_EDITS].sites)
    if seen != graph_sites:
        missing = sorted(set(graph_sites) - set(seen))[:3]
        raise PlanError(f"cannot apply the plan at call time: this model's calls do not match its graph's op names "
                        f"(graph only: {missing}, calls only: {sorted(set(seen) - set(graph_sites))[:3]})")
    error = relative_error(expected, actual)
    if not error <= TOLERANCE:
        raise PlanError(f"cannot apply the plan at call time: the planned model's outputs differ from the graph "
                        f"with the plan by {error:.3g} (relative; tolerance {TOLERANCE})")
