"""What a compression run did: depth, parameters and MACs before/after, each rewrite, each refusal."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import fx

from .graph import constant, tensor_shape
from .merge_math import layer_macs
from .ops import bind


@dataclass(frozen=True)
class Metrics:
    activations: int  # activation ops (ReLU, GELU, ...) in the graph
    weight_layers: int  # conv and linear ops
    depth: int  # weight layers on the longest input-to-output path
    params: int  # elements of the learned tensors: weights and biases (BatchNorm's included)
    macs: int  # multiply-accumulates on the example inputs
    buffers: int = 0  # elements of the other constants: BatchNorm running statistics, bias maps, counters

    @classmethod
    def of(cls, gm: fx.GraphModule) -> "Metrics":
        activations = weight_layers = macs = 0
        depth: dict[fx.Node, int] = {}
        not_learned: set[fx.Node] = set()
        for node in gm.graph.nodes:
            call = bind(node)
            is_weight_layer = call is not None and call.kind in ("conv", "linear")
            before = max((depth[arg] for arg in node.all_input_nodes if arg in depth), default=0)
            depth[node] = before + is_weight_layer
            if call is None:
                continue
            not_learned.update(arg for name in _NOT_LEARNED.get(call.kind, ()) if isinstance(arg := call.args.get(name),
                                                                                                 fx.Node))
            activations += call.kind == "activation"
            weight_layers += is_weight_layer
            if is_weight_layer:
                macs += _macs(call)
        learned, other = {}, {}
        for node in gm.graph.nodes:
            if (tensor := constant(gm, node)) is not None:
                is_learned = node not in not_learned and tensor.is_floating_point()
                (learned if is_learned else other)[id(tensor)] = tensor.numel()
        return cls(activations, weight_layers, max(depth.values(), default=0), sum(learned.values()), macs,
                   sum(size for key, size in other.items() if key not in learned))


_NOT_LEARNED = {"batch_norm": ("running_mean", "running_var"), "conv": ("bias_map",)}


def _macs(call) -> int:
    out_shape = tensor_shape(call.node)
    weight_shape = tensor_shape(call["weight"])
    return 0 if out_shape is None or weight_shape is None else layer_macs(weight_shape, out_shape)


@dataclass(frozen=True)
class Rewrite:
    pass_name: str
    sources: tuple[str, ...]  # stable names of the nodes replaced
    exact: bool
    detail: str = ""
    macs_before: int = 0  # predicted effect
    macs_after: int = 0
    latency_before_ms: float | None = None  # measured effect, with the latency cost model
    latency_after_ms: float | None = None


@dataclass(frozen=True)
class Skip:
    pass_name: str
    node: str
    reason: str


@dataclass(frozen=True)
class Check:
    pass_name: str
    relative_error: float  # max |delta| / max |ref| of the graph outputs against the graph before the pass
    rolled_back: str = ""  # the node whose rewrite was undone, if any
    verified: bool = True  # False for a plan pass, which changes the outputs by design


@dataclass
class Report:
    before: Metrics | None = None
    after: Metrics | None = None
    rewrites: list[Rewrite] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    latency: dict = field(default_factory=dict)

    @property
    def approximations(self) -> list[Rewrite]:
        return [rewrite for rewrite in self.rewrites if not rewrite.exact]

    @property
    def rollbacks(self) -> list[Check]:
        return [check for check in self.checks if check.rolled_back]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["approximations"] = len(self.approximations)
        return data

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    def __str__(self) -> str:
        lines = ["fxcompress report", ""]
        if self.before and self.after:
            lines.append(f"{'':16}{'before':>14}{'after':>14}{'ratio':>8}")
            for name in ("activations", "weight_layers", "depth", "params", "buffers", "macs"):
                old, new = getattr(self.before, name), getattr(self.after, name)
                ratio = f"{new / old:.3f}" if old else "-"
                lines.append(f"{name:16}{old:>14,}{new:>14,}{ratio:>8}")
        counts: dict[str, int] = {}
        for rewrite in self.rewrites:
            counts[rewrite.pass_name] = counts.get(rewrite.pass_name, 0) + 1
        lines += ["", "rewrites: " + (", ".join(f"{k} x{v}" for k, v in counts.items()) or "none")]
        for rewrite in self.approximations:
            lines.append(f"  approximate: {' + '.join(rewrite.sources)} ({rewrite.detail})")
        for check in self.rollbacks:
            lines.append(f"  rolled back: {check.pass_name} at {check.rolled_back} "
                         f"(relative error {check.relative_error:.2e})")
        reasons = Counter(f"{skip.pass_name}: {skip.reason}" for skip in self.skips)
        if reasons:
            lines.append(f"not rewritten: {len(self.skips)} candidates")
            lines += [f"  {count} x {reason}" for reason, count in reasons.most_common(5)]
        worst = max((check.relative_error for check in self.checks if check.verified and not check.rolled_back),
                    default=0.0)
        lines.append(f"largest relative output change after an exact pass: {worst:.2e}")
        planned = [f"{check.pass_name} {check.relative_error:.2e}" for check in self.checks if not check.verified]
        if planned:
            lines.append("relative output change made by the plan: " + ", ".join(planned))
        if self.latency:
            lines.append("latency: " + ", ".join(f"{key} {value}" for key, value in self.latency.items()))
        return "\n".join(lines)
