"""The op table: one place that knows how each capture dialect spells the ops the passes rewrite.

`torch.export` graphs use ATen overloads (`aten.conv2d.default`, `aten.batch_norm.default`); graphs that
dynamo hands a backend use `torch.conv2d`, `F.batch_norm`, `torch._C._nn.linear`, `operator.iadd`. `bind`
maps any of them to an `OpCall` whose arguments are bound by parameter name with defaults filled in, so
that passes never index `node.args` by position (`F.batch_norm` and `aten.batch_norm` order their
arguments differently). An op missing from the table is opaque: passes treat it as a merge blocker.
Attention ops are bound by `bind_attention` only, for token reduction, which reads their keys.
"""
from __future__ import annotations

import inspect
import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

aten = torch.ops.aten

CONV_BY_DIMS = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}


def conv_with_bias_map(input, weight, bias, stride, padding, groups, bias_map):
    """A convolution plus an input-independent additive map (emitted by exact border-corrected merges)."""
    conv = CONV_BY_DIMS[weight.dim() - 2]
    return conv(input, weight, bias, stride, padding, [1] * (weight.dim() - 2), groups) + bias_map


@dataclass(frozen=True)
class OpSpec:
    kind: str  # conv | linear | batch_norm | activation | add | dropout | pool | concat | attention
    name: str  # op name used in stable node names: equal across dialects
    params: tuple[str, ...]
    defaults: tuple[tuple[str, Any], ...] = ()
    tuple_output: bool = False  # the tensor result is element 0 of a tuple


_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = (("bias", None), ("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1))
_ATEN_BN = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
            "cudnn_enabled")
_BN_DEFAULTS = (("weight", None), ("bias", None), ("training", False), ("momentum", 0.1), ("eps", 1e-5))
_ADD = ("input", "other", "alpha")


def _activation(name: str, *params: str, **defaults: Any) -> OpSpec:
    return OpSpec("activation", name, ("input",) + params, tuple(defaults.items()))


_TABLE: dict[Any, OpSpec] = {}


def _register(targets, spec: OpSpec) -> None:
    for target in targets:
        _TABLE[target] = spec


for _dims in (1, 2, 3):
    _register([getattr(torch, f"conv{_dims}d"), getattr(aten, f"conv{_dims}d").default,
               getattr(aten, f"conv{_dims}d").padding],  # .padding: padding="same" or "valid"
              OpSpec("conv", "conv", _CONV, _CONV_DEFAULTS))
_register([aten.convolution.default], OpSpec(
    "conv", "conv", ("input", "weight", "bias", "stride", "padding", "dilation", "transposed",
                     "output_padding", "groups")))
_register([conv_with_bias_map], OpSpec(
    "conv", "conv", ("input", "weight", "bias", "stride", "padding", "groups", "bias_map")))
_register([torch._C._nn.linear, aten.linear.default], OpSpec("linear", "linear", ("input", "weight", "bias"),
                                                              (("bias", None),)))
_register([F.batch_norm], OpSpec(
    "batch_norm", "batch_norm",
    ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"), _BN_DEFAULTS))
_register([torch.batch_norm, aten.batch_norm.default], OpSpec("batch_norm", "batch_norm", _ATEN_BN, _BN_DEFAULTS))
_register([aten._native_batch_norm_legit_no_training.default], OpSpec(
    "batch_norm", "batch_norm", ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps"),
    _BN_DEFAULTS, tuple_output=True))

_register([torch.relu, torch.relu_, F.relu, aten.relu.default, aten.relu_.default], _activation("relu", "inplace"))
_register([F.relu6], _activation("hardtanh", "inplace", min_val=0.0, max_val=6.0))
_register([F.hardtanh, torch._C._nn.hardtanh, aten.hardtanh.default, aten.hardtanh_.default],
          _activation("hardtanh", "min_val", "max_val", "inplace", min_val=-1.0, max_val=1.0))
_register([F.gelu, aten.gelu.default], _activation("gelu", "approximate"))
_register([F.silu, aten.silu.default, aten.silu_.default], _activation("silu", "inplace"))
_register([F.hardswish, aten.hardswish.default, aten.hardswish_.default], _activation("hardswish", "inplace"))
_register([F.leaky_relu, aten.leaky_relu.default, aten.leaky_relu_.default],
          _activation("leaky_relu", "negative_slope", "inplace", negative_slope=0.01))

_register([operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add_.Tensor],
          OpSpec("add", "add", _ADD, (("alpha", 1),)))
_register([F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout], OpSpec(
    "dropout", "dropout", ("input", "p", "training", "inplace"), (("p", 0.5), ("training", True))))
_register([torch.dropout, aten.dropout.default], OpSpec("dropout", "dropout", ("input", "p", "train")))

_MAX_POOL = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_AVG_POOL = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
for _dims in (1, 2, 3):
    _register([getattr(F, f"max_pool{_dims}d"), getattr(torch, f"max_pool{_dims}d"),
               getattr(aten, f"max_pool{_dims}d").default], OpSpec("pool", f"max_pool{_dims}d", _MAX_POOL))
    _register([getattr(F, f"avg_pool{_dims}d"), getattr(aten, f"avg_pool{_dims}d").default],
              OpSpec("pool", f"avg_pool{_dims}d", _AVG_POOL))
    _register([getattr(F, f"adaptive_avg_pool{_dims}d"), getattr(aten, f"adaptive_avg_pool{_dims}d").default],
              OpSpec("pool", f"adaptive_avg_pool{_dims}d", ("input", "output_size")))
_register([torch.cat, aten.cat.default], OpSpec("concat", "cat", ("tensors", "dim"), (("dim", 0),)))

ACTIVATION_NAMES = frozenset(spec.name for spec in _TABLE.values() if spec.kind == "activation")

# Attention, kept out of `_TABLE` (the passes treat it as opaque): token reduction reads its keys.
_ATTENTION: dict[Any, OpSpec] = {}
_SDPA = OpSpec("attention", "scaled_dot_product_attention",
               ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
               (("attn_mask", None), ("dropout_p", 0.0), ("is_causal", False), ("scale", None), ("enable_gqa", False)))
_MHA_PARAMS = inspect.signature(F.multi_head_attention_forward).parameters.values()
_MHA = OpSpec("attention", "multi_head_attention_forward", tuple(p.name for p in _MHA_PARAMS),
              tuple((p.name, p.default) for p in _MHA_PARAMS if p.default is not inspect.Parameter.empty),
              tuple_output=True)
_ATTENTION.update({F.scaled_dot_product_attention: _SDPA, aten.scaled_dot_product_attention.default: _SDPA,
                   F.multi_head_attention_forward: _MHA})


@dataclass(frozen=True)
class OpCall:
    """A recognised op with its arguments bound by parameter name."""

    kind: str
    name: str
    node: fx.Node
    args: dict[str, Any]
    tuple_output: bool = False

    def __getitem__(self, param: str) -> Any:
        return self.args[param]

    @property
    def output(self) -> fx.Node:
        """The node that carries the tensor result (the getitem for tuple-returning ops)."""
        if not self.tuple_output:
            return self.node
        items = [u for u in self.node.users if u.target is operator.getitem and u.args[1] == 0]
        return items[0] if len(items) == 1 else self.node


def spec_of(target) -> OpSpec | None:
    """The op table's entry for a call target (a torch function, an ATen overload), None for unknown ops."""
    return _TABLE.get(target)


def python_ops(kinds) -> dict[Any, OpSpec]:
    """The table's ops of `kinds` that a model's forward calls from Python (torch.* and F.* functions, not the
    ATen overloads that capture produces)."""
    return {target: spec for target, spec in _TABLE.items()
            if spec.kind in kinds and not isinstance(target, torch._ops.OpOverload)}


def bind(node: fx.Node) -> OpCall | None:
    """Bind `node` to the op table, or None for ops the passes do not know (opaque)."""
    return _bind(node, _TABLE)


def bind_attention(node: fx.Node) -> OpCall | None:
    """Bind `node` if it is an attention op (`scaled_dot_product_attention`, `multi_head_attention_forward`)."""
    return _bind(node, _ATTENTION)


def _bind(node: fx.Node, table: dict[Any, OpSpec]) -> OpCall | None:
    if node.op != "call_function":
        return None
    spec = table.get(node.target)
    if spec is None:
        return None
    if len(node.args) > len(spec.params):
        return None
    args = dict(spec.defaults)
    args.update(zip(spec.params, node.args))
    for key, value in node.kwargs.items():
        args["input" if key == "self" else key] = value
    return OpCall(spec.kind, spec.name, node, args, spec.tuple_output)


@dataclass(frozen=True)
class ActivationRegions:
    """What an activation outputs for its input z, the facts the criteria and the planner decide from.

    Identity on [low, high] (only approximately where `below` is "approximately zero"); above `high` the
    constant `high`; below `low`: "zero", the constant `value` ("constant"), `value` * z ("linear"), or
    "approximately zero" (GELU, SiLU, Hardswish: not exactly 0 below nor exactly z above, so no state
    of theirs is exact).
    """

    low: float
    high: float
    below: str  # zero | constant | linear | approximately zero
    value: float = 0.0  # the constant below `low`, or the slope

    @property
    def exact(self) -> bool:
        return self.below != "approximately zero"

    def describe_below(self) -> str:
        """What a channel below `low` outputs, in words."""
        return {"zero": "0", "constant": f"the constant {self.value}", "linear": f"{self.value} * z",
                "approximately zero": "approximately 0"}[self.below]


def activation_regions(call: OpCall) -> ActivationRegions:
    """The regions of a bound activation (see `ActivationRegions`)."""
    if call.name == "hardtanh":
        low, high = float(call["min_val"]), float(call["max_val"])
        return ActivationRegions(low, high, "zero" if low == 0 else "constant", low)
    if call.name == "leaky_relu":
        slope = float(call["negative_slope"])
        return ActivationRegions(0.0, math.inf, "zero" if slope == 0 else "linear", slope)
    if call.name == "relu":
        return ActivationRegions(0.0, math.inf, "zero")
    return ActivationRegions(0.0, math.inf, "approximately zero")


def set_argument(node: fx.Node, param: str, value: Any) -> None:
    """Set the argument bound to `param` (as `bind` names it), positional or keyword."""
    params = _TABLE[node.target].params
    index = params.index(param)
    if index < len(node.args):
        node.update_arg(index, value)
    else:
        node.update_kwarg("self" if param == "input" and "self" in node.kwargs else param, value)


def op_name(node: fx.Node) -> str:
    """A short name of the op a node runs: the table's name where known, else the target's own."""
    call = bind(node)
    if call is not None:
        return call.name
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return name.split(".")[0].rstrip("_")
    return node.op


def as_tuple(value: Any, dims: int) -> tuple[int, ...]:
    """Expand an int or 1-element list into a per-dimension tuple (convolution arguments)."""
    if isinstance(value, int):
        return (value,) * dims
    value = tuple(int(v) for v in value)
    return value * dims if len(value) == 1 else value
