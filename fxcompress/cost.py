"""The merge cost model: (cost, parameters) of a conv or linear, where cost is MACs or the latency measured
on the target lowering.

Latency is measured once per op signature and input shape on a stand-alone module of that one op, by a timer the
caller gives (`measure.op_timer`: lowered like the real model), and kept in a lookup table per lowering and device
(in memory, and in a JSON file when a path is given); the cost model itself does no timing. The chain cost is the
sum of its ops' latencies: launch overheads and fusions across ops are not modelled, which is why every merge is
reported with both. A bias map (a per-resolution constant derived from the weights, one add per output like a
bias) is not counted as parameters.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from .errors import OptionError, valid_choice
from .merge_math import ConvSpec, LinearSpec, layer_macs

COST_MODELS = ("macs", "latency")


class _SpecModule(torch.nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.spec = spec

    def forward(self, x):
        if isinstance(self.spec, LinearSpec):
            return torch.nn.functional.linear(x, self.spec.weight, self.spec.bias)
        return self.spec(x)


OpTimer = Callable[[torch.nn.Module, tuple], float]  # (a one-op module, its inputs) -> median ms


class MeasurementTable:
    """Measurements by key, each made once: kept in memory and, with `path`, in a JSON file, read back when it
    exists (the op latencies here, the regions' in `selection.latency`)."""

    def __init__(self, path: str | Path | None = None):
        self.path = None if path is None else Path(path)
        self.entries: dict = json.loads(self.path.read_text()) if self.path is not None and self.path.is_file() \
            else {}

    def measured(self, key: str, measure: Callable[[], object]):
        """The measurement kept under `key`, made by `measure()` (and kept) where there is none yet."""
        if key not in self.entries:
            self.entries[key] = measure()
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.path.write_text(json.dumps(self.entries, indent=1))
        return self.entries[key]


class LatencyTable(MeasurementTable):
    """Median latency (ms) of single ops, measured once per signature by `timer` (`measure.op_timer`: on one
    lowering and device, which `key` names in every entry)."""

    def __init__(self, timer: OpTimer, key: str, path: str | Path | None = None):
        super().__init__(path)
        self.timer, self.key = timer, key

    def latency(self, spec: ConvSpec | LinearSpec, in_shape) -> float:
        return self.measured(self._key(spec, in_shape), lambda: self._measure(spec, in_shape))

    def _key(self, spec, in_shape) -> str:
        shape = "x".join(map(str, in_shape))
        if isinstance(spec, LinearSpec):
            return f"{self.key}|linear|{tuple(spec.weight.shape)}|{spec.bias is not None}|{shape}"
        return (f"{self.key}|conv|{tuple(spec.weight.shape)}|g{spec.groups}|s{spec.stride}"
                f"|p{spec.padding}{f'|d{spec.dilation}' if spec.is_dilated else ''}"
                f"|{spec.bias is not None}|{spec.bias_map is not None}|{shape}|{spec.weight.dtype}")

    def _measure(self, spec, in_shape) -> float:
        return self.timer(_SpecModule(spec).eval(), (torch.randn(*in_shape, dtype=spec.weight.dtype),))


class CostModel:
    """What a merge is judged by: MACs (default) or measured latency, paired with the parameter count."""

    def __init__(self, kind: str = "macs", table: LatencyTable | None = None):
        valid_choice("cost model", kind, COST_MODELS)
        if kind == "latency" and table is None:
            raise OptionError("the latency cost model needs a latency table (cost.LatencyTable)")
        self.kind, self.table = kind, table

    def conv(self, spec: ConvSpec, in_shape, out_size) -> tuple[float, int]:
        params = spec.weight.numel() + (0 if spec.bias is None else spec.bias.numel())
        if self.kind == "latency":
            return self.table.latency(spec, in_shape), params
        return layer_macs(spec.weight.shape, (in_shape[0], spec.out_channels, *out_size)), params

    def linear(self, spec: LinearSpec, in_shape) -> tuple[float, int]:
        params = spec.weight.numel() + (0 if spec.bias is None else spec.bias.numel())
        if self.kind == "latency":
            return self.table.latency(spec, in_shape), params
        return layer_macs(spec.weight.shape, (*in_shape[:-1], spec.weight.shape[0])), params


def merge_costs(model: CostModel, op: str, parts: list[tuple], merged: tuple) -> dict:
    """The `macs` and `latency` fields of a merge's `Site`: MACs before/after (the prediction) and, with the
    latency model, measured latency before/after. `parts` and `merged` are argument tuples of `CostModel.<op>`."""
    macs = getattr(MACS, op)
    costs = {"macs": (sum(macs(*part)[0] for part in parts), macs(*merged)[0])}
    if model.kind == "latency":
        latency = getattr(model, op)
        costs["latency"] = (sum(latency(*part)[0] for part in parts), latency(*merged)[0])
    return costs


MACS = CostModel("macs")
