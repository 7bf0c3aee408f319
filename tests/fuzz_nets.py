"""Random small networks for equivalence fuzzing (tests/test_fuzz.py, bench/fuzz.py).

A network is described by a plain spec (dicts and lists, printable, so that a failure found by
hypothesis can be pasted into a regression test) and built by `build`. Blocks: conv units (kernel 1-5,
stride 1-2, padding 0-2, grouped or depthwise, bias on/off, optional BatchNorm with randomised
statistics, optional activation), residual blocks (identity or strided 1x1 downsample shortcut),
parallel convs summed, concatenations, max/avg pooling, and a linear head. Each activation may be
marked `linear`: the plan linearises it, and the reference replaces it by identity without fxcompress.
"""
from __future__ import annotations

import copy
import math

import torch
from hypothesis import strategies as st
from torch import nn

import fxcompress

ACTIVATIONS = {"relu": (nn.ReLU, "relu"), "relu6": (nn.ReLU6, "hardtanh"), "gelu": (nn.GELU, "gelu"),
               "silu": (nn.SiLU, "silu"), "hardswish": (nn.Hardswish, "hardswish"),
               "leaky_relu": (nn.LeakyReLU, "leaky_relu")}


class Unit(nn.Module):
    """conv -> BatchNorm? -> activation?"""

    def __init__(self, cin: int, spec: dict):
        super().__init__()
        self.conv = nn.Conv2d(cin, spec["out"], spec["k"], spec["s"], spec["p"], groups=spec["g"], bias=spec["bias"])
        self.bn = nn.BatchNorm2d(spec["out"]) if spec["bn"] else nn.Identity()
        self.act = ACTIVATIONS[spec["act"]][0]() if spec["act"] else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


def _units(cin: int, specs: list[dict]) -> nn.Sequential:
    units = []
    for spec in specs:
        units.append(Unit(cin, spec))
        cin = spec["out"]
    return nn.Sequential(*units)


class Residual(nn.Module):
    def __init__(self, cin: int, spec: dict):
        super().__init__()
        self.body = _units(cin, spec["body"])
        self.shortcut = _units(cin, [spec["shortcut"]]) if spec["shortcut"] else None

    def forward(self, x):
        return self.body(x) + (x if self.shortcut is None else self.shortcut(x))


class Parallel(nn.Module):
    def __init__(self, cin: int, spec: dict):
        super().__init__()
        self.a, self.b = _units(cin, [spec["a"]]), _units(cin, [spec["b"]])

    def forward(self, x):
        return self.a(x) + self.b(x)


class Concat(nn.Module):
    def __init__(self, cin: int, spec: dict):
        super().__init__()
        self.a, self.b = _units(cin, [spec["a"]]), _units(cin, [spec["b"]])

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


class Head(nn.Module):
    def __init__(self, features: int, spec: dict):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1) if spec["pool"] else nn.Identity()
        self.fc1 = nn.Linear(features, spec["hidden"], bias=spec["bias"])
        self.bn = nn.BatchNorm1d(spec["hidden"]) if spec["bn"] else nn.Identity()
        self.act = ACTIVATIONS[spec["act"]][0]() if spec["act"] else nn.Identity()
        self.fc2 = nn.Linear(spec["hidden"], spec["classes"])

    def forward(self, x):
        return self.fc2(self.act(self.bn(self.fc1(torch.flatten(self.pool(x), 1)))))


def _pool(spec: dict) -> nn.Module:
    return (nn.MaxPool2d if spec["max"] else nn.AvgPool2d)(spec["k"], spec["s"])


BLOCKS = {"unit": lambda cin, spec: _units(cin, [spec]), "residual": Residual, "parallel": Parallel,
          "concat": Concat, "pool": lambda cin, spec: _pool(spec)}


def build(spec: dict, seed: int = 0) -> tuple[nn.Module, tuple, tuple]:
    """(model in eval mode with randomised BatchNorm, example inputs, a second input of the same shape)."""
    torch.manual_seed(seed)
    cin = spec["channels"]
    blocks = []
    for block in spec["blocks"]:
        blocks.append(BLOCKS[block["kind"]](cin, block))
        cin = block_channels(cin, block)
    model = nn.Sequential(*blocks)
    size = spec["size"]
    for block in spec["blocks"]:
        size = block_size(size, block)
    features = cin if spec["head"]["pool"] else cin * size * size
    model.append(Head(features, spec["head"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                channels = module.num_features
                module.running_mean.copy_(torch.randn(channels, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(channels, generator=generator) * 1.5 + 0.5)
                module.weight.copy_(1 + 0.3 * torch.randn(channels, generator=generator))
                module.bias.copy_(0.3 * torch.randn(channels, generator=generator))
    shape = (spec["batch"], spec["channels"], spec["size"], spec["size"])
    return model.eval(), (torch.randn(shape, generator=generator),), (torch.randn(shape, generator=generator),)


def linear_sites(model: nn.Module, spec: dict) -> dict[str, str]:
    """{module path: stable node name} of the activations the spec marks `linear`."""
    marked = {}
    for path, module in model.named_modules():
        unit_spec = _unit_spec(spec, path)
        if unit_spec is not None and unit_spec.get("act") and unit_spec.get("linear"):
            marked[f"{path}.act" if path else "act"] = ACTIVATIONS[unit_spec["act"]][1]
    return {path: f"{path}:{op}" for path, op in marked.items()}


def _unit_spec(spec: dict, path: str) -> dict | None:
    """The spec of the Unit or Head at module path `path` (e.g. "2.body.1", "0.0", "3"), else None."""
    parts = path.split(".")
    if not parts[0].isdigit():
        return None
    index = int(parts[0])
    if index == len(spec["blocks"]):
        return spec["head"] if len(parts) == 1 else None
    block = spec["blocks"][index]
    rest = parts[1:]
    if block["kind"] == "unit":
        return block if rest == ["0"] else None
    if block["kind"] == "residual" and len(rest) == 2:
        return block["body"][int(rest[1])] if rest[0] == "body" else block["shortcut"] if rest == ["shortcut", "0"] \
            else None
    if block["kind"] in ("parallel", "concat") and len(rest) == 2 and rest[1] == "0":
        return block[rest[0]]
    return None


def linearized_reference(model: nn.Module, sites: dict[str, str]) -> nn.Module:
    reference = copy.deepcopy(model)
    for path in sites:
        parent, _, name = path.rpartition(".")
        setattr(reference.get_submodule(parent), name, nn.Identity())
    return reference


def block_channels(cin: int, block: dict) -> int:
    if block["kind"] == "unit":
        return block["out"]
    if block["kind"] == "residual":
        return block["body"][-1]["out"]
    if block["kind"] == "parallel":
        return block["a"]["out"]
    if block["kind"] == "concat":
        return block["a"]["out"] + block["b"]["out"]
    return cin


def block_size(size: int, block: dict) -> int:
    if block["kind"] == "unit":
        return conv_out(size, block)
    if block["kind"] == "residual":
        for unit in block["body"]:
            size = conv_out(size, unit)
        return size
    if block["kind"] in ("parallel", "concat"):
        return conv_out(size, block["a"])
    return (size - block["k"]) // block["s"] + 1


def conv_out(size: int, unit: dict) -> int:
    return (size + 2 * unit["p"] - unit["k"]) // unit["s"] + 1


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def units(draw, cin: int, size: int, *, out: int | None = None, k=None, s=None, p=None):
    """A conv unit reading `cin` channels of spatial `size` (its output stays at least 1 pixel)."""
    out = out if out is not None else draw(st.integers(1, 12))
    k = k if k is not None else draw(st.integers(1, min(5, size + 4)))
    s = s if s is not None else draw(st.integers(1, 2))
    p = p if p is not None else draw(st.integers(max(0, math.ceil((k - size) / 2)), 2))
    groups = draw(st.sampled_from(_divisors(math.gcd(cin, out))))  # includes depthwise when cin == out
    act = draw(st.sampled_from([None] + sorted(ACTIVATIONS)))
    return {"out": out, "k": k, "s": s, "p": p, "g": groups, "bias": draw(st.booleans()), "bn": draw(st.booleans()),
            "act": act, "linear": act is not None and draw(st.booleans())}


@st.composite
def blocks(draw, cin: int, size: int):
    kinds = ["unit", "residual", "parallel", "concat"] + (["pool"] if size >= 2 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "unit":
        return {"kind": "unit", **draw(units(cin, size))}
    if kind == "pool":
        k = draw(st.integers(1, min(3, size)))
        return {"kind": "pool", "max": draw(st.booleans()), "k": k, "s": draw(st.integers(1, 2))}
    if kind in ("parallel", "concat"):
        out = draw(st.integers(1, 12))
        k_a, k_b = draw(st.sampled_from([1, 3, 5])), draw(st.sampled_from([1, 3, 5]))
        stride = draw(st.integers(1, 2))
        same = lambda k: {"k": k, "p": k // 2, "s": stride}  # noqa: E731  (equal output sizes on both sides)
        out_b = out if kind == "parallel" else draw(st.integers(1, 12))
        return {"kind": kind, "a": draw(units(cin, size, out=out, **same(k_a))),
                "b": draw(units(cin, size, out=out_b, **same(k_b)))}
    depth = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    cout = draw(st.sampled_from([cin, draw(st.integers(1, 12))]))
    body, channels = [], cin
    for i in range(depth):
        k = draw(st.sampled_from([1, 3, 5]))
        width = cout if i == depth - 1 else draw(st.integers(1, 12))
        unit = draw(units(channels, size, out=width, k=k, p=k // 2, s=stride if i == 0 else 1))
        body.append(unit)
        channels = width
    shortcut = None
    if stride != 1 or cout != cin or draw(st.booleans()):
        shortcut = draw(units(cin, size, out=cout, k=1, p=0, s=stride))
    return {"kind": "residual", "body": body, "shortcut": shortcut}


@st.composite
def networks(draw):
    channels, size = draw(st.integers(1, 8)), draw(st.integers(4, 14))
    spec = {"channels": channels, "size": size, "batch": draw(st.integers(1, 2)), "linearize": draw(st.booleans()),
            "blocks": []}
    for _ in range(draw(st.integers(1, 4))):
        block = draw(blocks(channels, size))
        spec["blocks"].append(block)
        channels, size = block_channels(channels, block), block_size(size, block)
    act = draw(st.sampled_from([None] + sorted(ACTIVATIONS)))
    spec["head"] = {"pool": draw(st.booleans()), "hidden": draw(st.integers(1, 16)), "bias": draw(st.booleans()),
                    "bn": draw(st.booleans()), "act": act, "linear": act is not None and draw(st.booleans()),
                    "classes": draw(st.integers(1, 5))}
    return spec


def relative_error(references: list[torch.Tensor], actuals: list[torch.Tensor]) -> float:
    """max |actual - reference| / max |reference|, both over all inputs: one output that happens to be near
    zero (a cancelling sum) does not make a rounding difference look large."""
    error = max((actual - reference).abs().max() for reference, actual in zip(references, actuals))
    return (error / max(reference.abs().max() for reference in references).clamp(min=1e-12)).item()


def check(spec: dict, seed: int = 0) -> float:
    """Compress one network and compare it with its reference on the example and on a fresh input: the
    model itself (exact pipeline), or, when the spec says `linearize`, the model with its marked
    activations replaced by identity (plan + forced exact merges). Returns the larger relative error;
    raises AssertionError on a mismatch, a rolled-back exact rewrite or an approximate one."""
    model, example, other = build(spec, seed)
    sites = linear_sites(model, spec) if spec["linearize"] else {}
    with torch.no_grad():
        if sites:
            result = fxcompress.compress(model, example, plan=fxcompress.Plan.linearize(sites.values()), force=True)
            reference = linearized_reference(model, sites)
        else:
            result, reference = fxcompress.compress(model, example), model
        assert not result.report.rollbacks, f"exact rewrite rolled back: {result.report.rollbacks} for spec {spec}"
        assert not result.report.approximations, f"approximate rewrite: {result.report.approximations}"
        error = relative_error([reference(*inputs) for inputs in (example, other)],
                               [result.module(*inputs) for inputs in (example, other)])
    assert error <= 1e-5, f"outputs differ by {error:.2e} for spec {spec}"
    return error
