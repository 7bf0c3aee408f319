"""Random small networks for equivalence fuzzing (tests/test_fuzz.py, bench/fuzz.py).

A network is described by a plain spec (dicts and lists, printable, so that a failure found by
hypothesis can be pasted into a regression test) and built by `build`.

Conv layout (1-, 2- or 3-D): conv units (kernel 1-5, square or not, stride 1-3, padding 0-2 or
"same"/"valid", dilation 1-3, padding mode zeros/reflect/replicate/circular, transposed, grouped or
depthwise, bias on/off, weight plain, weight-normalised or pruned, optional BatchNorm with randomised
statistics, optional activation: ReLU, ReLU6, Hardtanh with a random range, LeakyReLU with a random slope,
GELU, SiLU, Hardswish), residual blocks (identity or strided 1x1 shortcut), parallel convs summed,
concatenations, max/avg pooling and a linear head. Token layout (N, T, C): linears with GELU and other
activations, residual MLPs, a mean over tokens and a linear head.

Each spec carries one `action`, checked against a reference built in plain torch, without fxcompress:
- None: the exact pipeline; the reference is the model itself (and, with `backend`, the same through
  `torch.compile(backend="depthprune")`).
- "linearize": the activations marked `linear` become identity (plan + forced exact merges); the reference
  is the model with those activations replaced by `nn.Identity`.
- "remove_channels" / "zero_channels": channels `off` of the activation of unit `target` are made exactly
  zero on the inputs used (BatchNorm statistics taken from those inputs, beta far below zero); the
  reference is the model itself.
- "remove_block": residual block `target` is replaced by its shortcut; the reference is the model with
  that block replaced by its shortcut module.
- "bn": `criterion="bn"`; every BatchNorm before an activation is either confident (each channel's beta
  at least 8 |gamma| above or below zero, judged on the inputs used: the criterion's error probability is
  ~1e-15, so what it removes or linearises is exact) or clearly not (one channel's beta is 0). The
  reference is the model itself: the planner must be exact or refuse.

`features` names what a spec exercises (bench/fuzz.py counts examples and failures per feature).
"""
from __future__ import annotations

import math

import torch
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations, prune

import fxcompress

ACTIVATIONS = {"relu": (nn.ReLU, "relu"), "relu6": (nn.ReLU6, "hardtanh"), "gelu": (nn.GELU, "gelu"),
               "silu": (nn.SiLU, "silu"), "hardswish": (nn.Hardswish, "hardswish"),
               "leaky_relu": (nn.LeakyReLU, "leaky_relu"), "hardtanh": (nn.Hardtanh, "hardtanh")}
ZERO_WHEN_OFF = ("relu", "relu6")  # activations whose off region outputs exactly 0
SURE_ACTIVATIONS = ("relu", "relu6", "hardtanh", "leaky_relu")  # piecewise linear: "bn" confident cases
ACTIONS = ("bn", "remove_channels", "zero_channels", "remove_block", "linearize", None)
PLAN_PASSES = ("linearize", "remove_channels", "zero_channels", "remove_block")  # change outputs by design
FLOAT64_TOLERANCE = 1e-9  # a float64 compression this close to the float64 reference is exact
MARGIN = 8.0  # |beta| / |gamma| of a confident channel: error probability Phi(-8) ~ 6e-16
MAX_SIZE = 24  # transposed convs stop growing the map beyond this


def _tuple(value, dims: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * dims


def _sizes(spec: dict) -> list[int]:
    return list(_tuple(spec["size"], spec.get("dims", 2)))


def _activation(spec: dict) -> nn.Module:
    if not spec.get("act"):
        return nn.Identity()
    return ACTIVATIONS[spec["act"]][0](**spec.get("act_args", {}))


def _weighted(module: nn.Module, kind: str | None) -> nn.Module:
    """The module with its weight computed: weight-normalised (a parametrisation) or pruned (a mask)."""
    if kind == "weight_norm":
        return parametrizations.weight_norm(module)
    if kind == "prune":
        prune.l1_unstructured(module, "weight", amount=0.5)
    return module


def _conv(cin: int, spec: dict, dims: int) -> nn.Module:
    kind = {(1, False): nn.Conv1d, (2, False): nn.Conv2d, (3, False): nn.Conv3d, (1, True): nn.ConvTranspose1d,
            (2, True): nn.ConvTranspose2d, (3, True): nn.ConvTranspose3d}[dims, bool(spec.get("transpose"))]
    options = {"stride": spec["s"], "padding": spec["p"], "dilation": spec.get("d", 1), "groups": spec["g"],
               "bias": spec["bias"]}
    if not spec.get("transpose"):
        options["padding_mode"] = spec.get("pm", "zeros")
    return _weighted(kind(cin, spec["out"], spec["k"], **options), spec.get("weight"))


BATCHNORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class Unit(nn.Module):
    """conv -> BatchNorm? -> activation?"""

    def __init__(self, cin: int, spec: dict, dims: int = 2):
        super().__init__()
        self.conv = _conv(cin, spec, dims)
        self.bn = BATCHNORMS[dims](spec["out"]) if spec["bn"] else nn.Identity()
        self.act = _activation(spec)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


def _units(cin: int, specs: list[dict], dims: int) -> nn.Sequential:
    units = []
    for spec in specs:
        units.append(Unit(cin, spec, dims))
        cin = spec["out"]
    return nn.Sequential(*units)


class Residual(nn.Module):
    def __init__(self, cin: int, spec: dict, dims: int):
        super().__init__()
        self.body = _units(cin, spec["body"], dims)
        self.shortcut = _units(cin, [spec["shortcut"]], dims) if spec["shortcut"] else None

    def forward(self, x):
        return self.body(x) + (x if self.shortcut is None else self.shortcut(x))


class Shortcut(nn.Module):
    """A residual block without its body: the remove_block reference."""

    def __init__(self, shortcut: nn.Module | None):
        super().__init__()
        self.shortcut = shortcut

    def forward(self, x):
        return x if self.shortcut is None else self.shortcut(x)


class Parallel(nn.Module):
    def __init__(self, cin: int, spec: dict, dims: int):
        super().__init__()
        self.a, self.b = _units(cin, [spec["a"]], dims), _units(cin, [spec["b"]], dims)

    def forward(self, x):
        return self.a(x) + self.b(x)


class Concat(nn.Module):
    def __init__(self, cin: int, spec: dict, dims: int):
        super().__init__()
        self.a, self.b = _units(cin, [spec["a"]], dims), _units(cin, [spec["b"]], dims)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


class Head(nn.Module):
    def __init__(self, features: int, spec: dict, dims: int = 2):
        super().__init__()
        self.pool = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)[dims - 1](1) \
            if spec["pool"] else nn.Identity()
        self.fc1 = _weighted(nn.Linear(features, spec["hidden"], bias=spec["bias"]), spec.get("weight"))
        self.bn = nn.BatchNorm1d(spec["hidden"]) if spec["bn"] else nn.Identity()
        self.act = _activation(spec)
        self.fc2 = nn.Linear(spec["hidden"], spec["classes"])

    def forward(self, x):
        return self.fc2(self.act(self.bn(self.fc1(torch.flatten(self.pool(x), 1)))))


def _pool(spec: dict, dims: int) -> nn.Module:
    return ((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d), (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d))[
        bool(spec["max"])][dims - 1](spec["k"], spec["s"])


class TokenUnit(nn.Module):
    """linear -> activation? on (N, T, C)"""

    def __init__(self, cin: int, spec: dict):
        super().__init__()
        self.fc = _weighted(nn.Linear(cin, spec["out"], bias=spec["bias"]), spec.get("weight"))
        self.act = _activation(spec)

    def forward(self, x):
        return self.act(self.fc(x))


class TokenResidual(nn.Module):
    """x + fc2(act(fc1(x))): a transformer MLP on (N, T, C)."""

    def __init__(self, cin: int, spec: dict):
        super().__init__()
        self.fc1 = _weighted(nn.Linear(cin, spec["hidden"], bias=spec["bias"]), spec.get("weight"))
        self.act = _activation(spec)
        self.fc2 = nn.Linear(spec["hidden"], cin)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


class TokenHead(nn.Module):
    def __init__(self, features: int, spec: dict):
        super().__init__()
        self.fc = nn.Linear(features, spec["classes"], bias=spec["bias"])

    def forward(self, x):
        return self.fc(x.mean(1))


BLOCKS = {"unit": lambda cin, spec, dims: _units(cin, [spec], dims), "residual": Residual, "parallel": Parallel,
          "concat": Concat, "pool": lambda cin, spec, dims: _pool(spec, dims),
          "tunit": lambda cin, spec, dims: TokenUnit(cin, spec), "tresidual": lambda cin, spec, dims:
          TokenResidual(cin, spec)}


def _action(spec: dict) -> str | None:
    return spec.get("action", "linearize" if spec.get("linearize") else None)


def build(spec: dict, seed: int = 0) -> tuple[nn.Module, tuple, tuple]:
    """(model in eval mode with randomised BatchNorm, example inputs, a second input of the same shape)."""
    torch.manual_seed(seed)
    dims, cin = spec.get("dims", 2), spec["channels"]
    model = nn.Sequential()
    for block in spec["blocks"]:
        model.append(BLOCKS[block["kind"]](cin, block, dims))
        cin = block_channels(cin, block)
    if spec.get("layout") == "tokens":
        model.append(TokenHead(cin, spec["head"]))
        shape = (spec["batch"], spec["tokens"], spec["channels"])
    else:
        sizes = _sizes(spec)
        for block in spec["blocks"]:
            sizes = block_sizes(sizes, block)
        model.append(Head(cin if spec["head"]["pool"] else cin * math.prod(sizes), spec["head"], dims))
        shape = (spec["batch"], spec["channels"], *_sizes(spec))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                channels = module.num_features
                module.running_mean.copy_(torch.randn(channels, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(channels, generator=generator) * 1.5 + 0.5)
                module.weight.copy_(1 + 0.3 * torch.randn(channels, generator=generator))
                module.bias.copy_(0.3 * torch.randn(channels, generator=generator))
    example, other = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    model.eval()
    _set_channel_states(model, spec, torch.cat([example, other]), generator)
    return model, (example,), (other,)


def _set_channel_states(model: nn.Module, spec: dict, inputs: torch.Tensor, generator: torch.Generator) -> None:
    """Make the BatchNorms the action needs confident: off (or on) channels stay off (on) on `inputs`."""
    action, states = _action(spec), {}
    for path, unit in unit_paths(spec):
        bn = model.get_submodule(path).bn if unit.get("bn") and unit.get("act") else None
        if bn is None:
            continue
        if action in ("remove_channels", "zero_channels") and path == spec["target"]:
            states[bn] = {c: False for c in spec["off"]}
        elif action == "bn" and unit.get("sure"):
            states[bn] = {c: bool(torch.rand(1, generator=generator) < 0.5) for c in range(bn.num_features)}
        elif action == "bn":
            with torch.no_grad():
                bn.bias[0] = 0.0  # error probability 0.5: the criterion must refuse this layer
    if states:
        _calibrate(model, states, inputs)


def _calibrate(model: nn.Module, states: dict[nn.Module, dict[int, bool]], inputs: torch.Tensor) -> None:
    """Set each BatchNorm's statistics to those of its input on `inputs` (in forward order, so that
    upstream changes are seen) and beta to +-max(8, 1.5 max |normalised input|) |gamma| on its channels."""

    def hook(bn, args):
        x = args[0].transpose(0, 1).flatten(1)
        bn.running_mean.copy_(x.mean(1))
        bn.running_var.copy_(x.var(1, unbiased=False))
        spread = ((x - bn.running_mean[:, None]) / torch.sqrt(bn.running_var[:, None] + bn.eps)).abs().amax(1)
        for channel, on in states[bn].items():
            if bn.weight[channel].abs() < 0.1:
                bn.weight[channel] = 0.5
            margin = max(MARGIN, 1.5 * spread[channel].item()) * bn.weight[channel].abs()
            bn.bias[channel] = margin if on else -margin

    handles = [bn.register_forward_pre_hook(hook) for bn in states]
    with torch.no_grad():
        model(inputs)
    for handle in handles:
        handle.remove()


def unit_paths(spec: dict) -> list[tuple[str, dict]]:
    """(module path, spec) of every unit that has an activation slot: conv Units, token units, the head."""
    found = []
    for index, block in enumerate(spec["blocks"]):
        if block["kind"] == "unit":
            found.append((f"{index}.0", block))
        elif block["kind"] == "residual":
            found += [(f"{index}.body.{i}", unit) for i, unit in enumerate(block["body"])]
            if block["shortcut"]:
                found.append((f"{index}.shortcut.0", block["shortcut"]))
        elif block["kind"] in ("parallel", "concat"):
            found += [(f"{index}.{side}.0", block[side]) for side in ("a", "b")]
        elif block["kind"] in ("tunit", "tresidual"):
            found.append((str(index), block))
    if spec.get("layout") != "tokens":
        found.append((str(len(spec["blocks"])), spec["head"]))
    return found


def activation_name(path: str, unit: dict) -> str:
    return f"{path}.act:{ACTIVATIONS[unit['act']][1]}"


def linear_sites(spec: dict) -> dict[str, str]:
    """{module path: stable node name} of the activations the spec marks `linear`."""
    return {f"{path}.act": activation_name(path, unit) for path, unit in unit_paths(spec)
            if unit.get("act") and unit.get("linear")}


def reference_model(spec: dict, seed: int = 0) -> nn.Module:
    """The network the spec's action should give, built again in plain torch (pruned modules cannot be
    deep-copied): the marked activations replaced by identity for "linearize", the target block by its
    shortcut for "remove_block", else the network itself (off channels are exactly zero already)."""
    reference = build(spec, seed)[0]
    action = _action(spec)
    if action == "linearize":
        for path in linear_sites(spec):
            parent, _, name = path.rpartition(".")
            setattr(reference.get_submodule(parent), name, nn.Identity())
    elif action == "remove_block":
        block = reference[spec["target"]]
        reference[spec["target"]] = nn.Identity() if isinstance(block, TokenResidual) else Shortcut(block.shortcut)
    return reference


def block_channels(cin: int, block: dict) -> int:
    if block["kind"] in ("unit", "tunit"):
        return block["out"]
    if block["kind"] == "residual":
        return block["body"][-1]["out"]
    if block["kind"] == "parallel":
        return block["a"]["out"]
    if block["kind"] == "concat":
        return block["a"]["out"] + block["b"]["out"]
    return cin


def block_sizes(sizes: list[int], block: dict) -> list[int]:
    if block["kind"] == "unit":
        return conv_out(sizes, block)
    if block["kind"] == "residual":
        for unit in block["body"]:
            sizes = conv_out(sizes, unit)
        return sizes
    if block["kind"] in ("parallel", "concat"):
        return conv_out(sizes, block["a"])
    if block["kind"] == "pool":
        return [(n - block["k"]) // block["s"] + 1 for n in sizes]
    return sizes


def conv_out(sizes: list[int], unit: dict) -> list[int]:
    dims = len(sizes)
    if unit["p"] == "same":
        return list(sizes)
    padding = _tuple(0 if unit["p"] == "valid" else unit["p"], dims)
    shape = zip(sizes, _tuple(unit["k"], dims), _tuple(unit["s"], dims), padding, _tuple(unit.get("d", 1), dims))
    if unit.get("transpose"):
        return [(n - 1) * s - 2 * p + d * (k - 1) + 1 for n, k, s, p, d in shape]
    return [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in shape]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _chance(draw, percent: int) -> bool:
    return draw(st.integers(0, 99)) < percent


def _per_dim(draw, dims: int, strategy, square: bool = False):
    """One value for every dimension (an int), or, one time in five, one per dimension (a list)."""
    if square or dims == 1 or not _chance(draw, 20):
        return draw(strategy)
    return [draw(strategy) for _ in range(dims)]


@st.composite
def activations(draw, choices=tuple(sorted(ACTIVATIONS))):
    """(name or None, constructor keywords): Hardtanh with a random range, LeakyReLU with a random slope."""
    act = draw(st.sampled_from((None,) + tuple(choices)))
    if act == "hardtanh":
        low = draw(st.sampled_from([-2.0, -1.0, -0.5, 0.0, 0.5]))
        return act, {"min_val": low, "max_val": low + draw(st.sampled_from([0.5, 1.0, 3.0]))}
    if act == "leaky_relu":
        return act, {"negative_slope": draw(st.sampled_from([0.01, 0.1, 0.2, 0.5, 1.5]))}
    return act, {}


def _weight_kind(draw) -> dict:
    kind = draw(st.sampled_from([None] * 8 + ["weight_norm", "prune"]))
    return {"weight": kind} if kind else {}


def _with_activation(draw, unit: dict) -> dict:
    act, args = draw(activations())
    unit.update({"act": act, "linear": act is not None and draw(st.booleans())})
    if args:
        unit["act_args"] = args
    return unit


def _padding(draw, sizes, k, s, d, pm_allowed: bool):
    """(padding, padding mode) keeping every output dimension >= 1 and reflect/circular padding valid."""
    dims = len(sizes)
    ks, ds = _tuple(k, dims), _tuple(d, dims)
    lows = [max(0, math.ceil((d_ * (k_ - 1) + 1 - n) / 2)) for n, k_, d_ in zip(sizes, ks, ds)]
    if _chance(draw, 5):
        if s == 1 and all(d_ * (k_ - 1) < n for n, k_, d_ in zip(sizes, ks, ds)) and draw(st.booleans()):
            return "same", "zeros"
        if not any(lows):
            return "valid", "zeros"
    if isinstance(k, list) or isinstance(d, list) or _chance(draw, 20):
        p = [draw(st.integers(low, max(low, 2))) for low in lows]
    else:
        p = draw(st.integers(max(lows), max(max(lows), 2)))
    pads = _tuple(p, dims)
    modes = ["zeros"]
    if pm_allowed and any(pads):
        modes += ["replicate"] + (["reflect"] if all(q < n for q, n in zip(pads, sizes)) else []) + \
            (["circular"] if all(q <= n for q, n in zip(pads, sizes)) else [])
    return p, draw(st.sampled_from(modes)) if _chance(draw, 30) else "zeros"


@st.composite
def units(draw, cin: int, sizes: list[int], *, out: int | None = None, k=None, s=None, same: bool = False,
          transpose: bool = False, widths: int = 12):
    """A conv unit reading `cin` channels of spatial `sizes` (its output stays at least 1 pixel). With
    `same`, padding keeps the size up to the stride (k odd, p = d (k - 1) / 2), as branches that are
    summed or concatenated need."""
    dims = len(sizes)
    out = out if out is not None else draw(st.integers(1, widths))
    d = _per_dim(draw, dims, st.sampled_from([1] * 6 + [2, 3])) if not transpose or _chance(draw, 30) else 1
    if k is None:
        small = min(sizes)
        k = _per_dim(draw, dims, st.sampled_from([1, 3, 5]) if same else st.integers(1, min(5, small + 4)))
    s = s if s is not None else draw(st.sampled_from([1] * 5 + [2] * 4 + [3]))
    unit = {"out": out, "k": k, "s": s}
    if same:
        ks, ds = _tuple(k, dims), _tuple(d, dims)
        unit["p"] = [d_ * (k_ - 1) // 2 for k_, d_ in zip(ks, ds)] if isinstance(k, list) or isinstance(d, list) \
            else d * (k - 1) // 2
        pads = _tuple(unit["p"], dims)
        if any(pads) and _chance(draw, 25):
            modes = ["replicate"] + (["reflect"] if all(q < n for q, n in zip(pads, sizes)) else [])
            unit["pm"] = draw(st.sampled_from(modes))
    elif transpose:
        unit["p"] = draw(st.integers(0, min(_tuple(d, dims)[i] * (_tuple(k, dims)[i] - 1) // 2 for i in range(dims))))
        unit["transpose"] = True
    else:
        unit["p"], pm = _padding(draw, sizes, k, s, d, pm_allowed=True)
        if pm != "zeros":
            unit["pm"] = pm
    if d != 1:
        unit["d"] = d
    unit["g"] = draw(st.sampled_from(_divisors(math.gcd(cin, out))))  # includes depthwise when cin == out
    unit.update({"bias": draw(st.booleans()), "bn": draw(st.booleans()), **_weight_kind(draw)})
    return _with_activation(draw, unit)


@st.composite
def blocks(draw, cin: int, sizes: list[int], widths: int = 12):
    kinds = ["unit", "residual", "parallel", "concat"] + (["pool"] if min(sizes) >= 2 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "unit":
        transpose = max(sizes) * 2 <= MAX_SIZE and _chance(draw, 15)
        s = draw(st.integers(1, 2)) if transpose else None
        return {"kind": "unit", **draw(units(cin, sizes, s=s, transpose=transpose, widths=widths))}
    if kind == "pool":
        k = draw(st.integers(1, min(3, *sizes)))
        return {"kind": "pool", "max": draw(st.booleans()), "k": k, "s": draw(st.integers(1, 2))}
    stride = draw(st.sampled_from([1, 1, 2, 3]))
    if kind in ("parallel", "concat"):
        out = draw(st.integers(1, widths))
        out_b = out if kind == "parallel" else draw(st.integers(1, widths))
        return {"kind": kind, "a": draw(units(cin, sizes, out=out, s=stride, same=True)),
                "b": draw(units(cin, sizes, out=out_b, s=stride, same=True))}
    depth = draw(st.integers(1, 3))
    cout = draw(st.sampled_from([cin, draw(st.integers(1, widths))]))
    body, channels, inner = [], cin, sizes
    for i in range(depth):
        width = cout if i == depth - 1 else draw(st.integers(1, widths))
        body.append(draw(units(channels, inner, out=width, s=stride if i == 0 else 1, same=True)))
        channels, inner = width, conv_out(inner, body[-1])
    shortcut = None
    if stride != 1 or cout != cin or draw(st.booleans()):
        shortcut = draw(units(cin, sizes, out=cout, k=1, s=stride, same=True))
    return {"kind": "residual", "body": body, "shortcut": shortcut}


@st.composite
def token_blocks(draw, cin: int):
    act, args = draw(activations(("gelu",) * 6 + tuple(sorted(ACTIVATIONS))))
    block = {"kind": draw(st.sampled_from(["tunit", "tresidual"])), "bias": draw(st.booleans()),
             "act": act, "linear": act is not None and draw(st.booleans()), **_weight_kind(draw)}
    block["out" if block["kind"] == "tunit" else "hidden"] = draw(st.integers(1, 16))
    if args:
        block["act_args"] = args
    return block


def _conv_network(draw) -> dict:
    dims = draw(st.sampled_from([1, 2, 2, 2, 2, 3]))
    channels = draw(st.integers(1, 4 if dims == 3 else 8))
    sizes = [draw(st.integers(3, 6))] * 3 if dims == 3 else [draw(st.integers(4, 24 if dims == 1 else 14))] * dims
    if dims == 2 and _chance(draw, 15):
        sizes[1] = draw(st.integers(4, 14))
    widths = 6 if dims == 3 else 12
    spec = {"dims": dims, "channels": channels, "size": sizes if len(set(sizes)) > 1 else sizes[0],
            "batch": draw(st.integers(1, 2)), "blocks": []}
    for _ in range(draw(st.integers(1, 4))):
        block = draw(blocks(channels, sizes, widths))
        spec["blocks"].append(block)
        channels, sizes = block_channels(channels, block), block_sizes(sizes, block)
    spec["head"] = _with_activation(draw, {"pool": draw(st.booleans()), "hidden": draw(st.integers(1, 16)),
                                           "bias": draw(st.booleans()), "bn": draw(st.booleans()),
                                           "classes": draw(st.integers(1, 5)), **_weight_kind(draw)})
    return spec


def _token_network(draw) -> dict:
    channels = draw(st.integers(1, 16))
    spec = {"layout": "tokens", "channels": channels, "tokens": draw(st.integers(1, 9)),
            "batch": draw(st.integers(1, 2)), "blocks": []}
    for _ in range(draw(st.integers(1, 4))):
        block = draw(token_blocks(channels))
        spec["blocks"].append(block)
        channels = block_channels(channels, block)
    spec["head"] = {"classes": draw(st.integers(1, 5)), "bias": draw(st.booleans())}
    return spec


def _removable_consumers(spec: dict, index: int) -> bool:
    """Whether block `index`'s output reaches only dense convs/linears through zero-keeping ops, so that
    channels zero there can be removed exactly."""
    following = spec["blocks"][index + 1:]
    while following and following[0]["kind"] == "pool":
        following = following[1:]
    if not following:
        return True  # the head: flatten (+ pool) into a linear
    block = following[0]
    if block["kind"] == "unit":
        return block["g"] == 1
    if block["kind"] == "residual":
        return block["shortcut"] is not None and block["body"][0]["g"] == 1 and block["shortcut"]["g"] == 1
    return block["a"]["g"] == 1 and block["b"]["g"] == 1


def _width(unit: dict) -> int:
    return unit["out"] if "out" in unit else unit["hidden"]


def _channel_targets(spec: dict, action: str) -> list[tuple[str, dict]]:
    """Units whose channels `action` may take once made off (BatchNorm + ReLU): any unit with an
    activation slot for zero_channels; for removal a dense conv or the head whose output is read only by
    dense convs/linears (not reaching a residual add or a sum)."""
    found = []
    for path, unit in unit_paths(spec):
        parts = path.split(".")
        if action == "zero_channels":
            found.append((path, unit))
        elif _width(unit) < 2 or unit.get("g", 1) != 1:
            continue
        elif len(parts) == 1:
            found.append((path, unit))  # the head's activation feeds fc2
        elif (block := spec["blocks"][int(parts[0])])["kind"] == "residual":
            position = int(parts[2]) if parts[1] == "body" else None
            if position is not None and position + 1 < len(block["body"]) and block["body"][position + 1]["g"] == 1:
                found.append((path, unit))
        elif block["kind"] in ("unit", "concat") and _removable_consumers(spec, int(parts[0])):
            found.append((path, unit))
    return found


def _make_off_able(draw, unit: dict) -> None:
    """BatchNorm + an activation that outputs exactly 0 when off (shapes unchanged)."""
    unit.pop("act_args", None)
    unit.update({"bn": True, "act": draw(st.sampled_from(ZERO_WHEN_OFF)), "linear": False})


def _draw_action(draw, spec: dict) -> None:
    action = draw(st.sampled_from(ACTIONS))
    if action in ("remove_channels", "zero_channels"):
        targets = _channel_targets(spec, action) if spec.get("layout") != "tokens" else []
        if not targets:
            action = None
        else:
            path, unit = draw(st.sampled_from(targets))
            _make_off_able(draw, unit)
            width = _width(unit)
            limit = width if action == "zero_channels" else width - 1
            spec["target"] = path
            spec["off"] = sorted(draw(st.sets(st.integers(0, width - 1), min_size=1, max_size=limit)))
    elif action == "remove_block":
        residuals = [i for i, block in enumerate(spec["blocks"]) if block["kind"] in ("residual", "tresidual")]
        if residuals:
            spec["target"] = draw(st.sampled_from(residuals))
        else:
            action = None
    elif action == "bn" and spec.get("layout") != "tokens":
        candidates = unit_paths(spec)
        for _, unit in candidates:
            if unit.get("bn") and unit.get("act") in SURE_ACTIVATIONS and _chance(draw, 75):
                unit["sure"] = True
        if not any(unit.get("sure") for _, unit in candidates):
            _, unit = draw(st.sampled_from(candidates))
            _make_off_able(draw, unit)
            unit["sure"] = True
    spec["action"] = action


@st.composite
def networks(draw, backend_percent: int = 0):
    """A conv (1-, 2- or 3-D) or token network spec with one action; `backend_percent` of the exact ones
    are also compiled with torch.compile(backend="depthprune")."""
    spec = _token_network(draw) if _chance(draw, 10) else _conv_network(draw)
    _draw_action(draw, spec)
    if spec["action"] is None and backend_percent and _chance(draw, backend_percent):
        spec["backend"] = True
    return spec


def features(spec: dict) -> set[str]:
    """What a spec exercises, for counting (bench/fuzz.py)."""
    found = {f"action_{_action(spec)}", spec.get("layout", "conv")}
    if spec.get("layout") != "tokens":
        found.add(f"conv{spec.get('dims', 2)}d")
    if spec.get("backend"):
        found.add("backend")
    for block in spec["blocks"]:
        found.add(f"block_{block['kind']}")
    if _action(spec) == "remove_block" and _deep_shortcut(spec["blocks"][spec["target"]]):
        found.add("remove_block_deep_shortcut")
    for _, unit in unit_paths(spec):
        found |= _unit_features(unit)
        if spec.get("action") == "bn" and unit.get("sure"):
            found.add(f"bn_criterion_{unit['act']}")
    return found


def _ops(unit: dict) -> int:
    """Ops on the data path of a conv unit: pad (a padding mode other than zeros), conv, BatchNorm, activation."""
    return (unit.get("pm", "zeros") != "zeros") + 1 + bool(unit["bn"]) + bool(unit["act"])


def _deep_shortcut(block: dict) -> bool:
    """A residual block whose shortcut has at least as many ops as its body."""
    return block["kind"] == "residual" and block["shortcut"] is not None and \
        sum(map(_ops, block["body"])) <= _ops(block["shortcut"])


def _unit_features(unit: dict) -> set[str]:
    found = set()
    if unit.get("act"):
        found.add(f"act_{unit['act']}")
    if unit.get("weight"):
        found.add(unit["weight"])
    if "k" in unit:
        conv = set()
        if any(d > 1 for d in _tuple(unit.get("d", 1), 1)):
            conv.add("dilation")
        if isinstance(unit["p"], str):
            conv.add("padding_str")
        if unit.get("pm", "zeros") != "zeros":
            conv.add(f"padding_mode_{unit['pm']}")
        if unit.get("transpose"):
            conv.add("transpose")
        if unit.get("weight"):
            conv.add(unit["weight"])
        found |= conv
        if any(isinstance(unit[key], list) for key in ("k", "s", "p")) or isinstance(unit.get("d"), list):
            found.add("non_square")
        if 3 in _tuple(unit["s"], 1):
            found.add("stride3")
        if unit["g"] > 1:
            found.add("grouped")
        if unit["bn"]:
            found |= {f"bn_after_{name}" for name in conv}
    elif unit.get("weight") and unit.get("bn"):
        found.add(f"bn_after_{unit['weight']}")  # the head: fc1 -> BatchNorm1d
    return found


def relative_error(references: list[torch.Tensor], actuals: list[torch.Tensor]) -> float:
    """max |actual - reference| / max |reference|, both over all inputs: one output that happens to be near
    zero (a cancelling sum) does not make a rounding difference look large."""
    error = max((actual - reference).abs().max() for reference, actual in zip(references, actuals))
    return (error / max(reference.abs().max() for reference in references).clamp(min=1e-12)).item()


def _compress(model: nn.Module, example: tuple, spec: dict) -> fxcompress.CompressResult:
    action = _action(spec)
    if action == "linearize" and linear_sites(spec):
        plan = fxcompress.Plan.linearize(linear_sites(spec).values())
        return fxcompress.compress(model, example, plan=plan, force=True)
    if action in ("remove_channels", "zero_channels"):
        unit = dict(unit_paths(spec))[spec["target"]]
        decision = fxcompress.Decision(action, activation_name(spec["target"], unit), {"channels": spec["off"]})
        return fxcompress.compress(model, example, plan=fxcompress.Plan((decision,)), force=True)
    if action == "remove_block":
        decision = fxcompress.Decision("remove_block", f"{spec['target']}:add")
        return fxcompress.compress(model, example, plan=fxcompress.Plan((decision,)), force=True)
    if action == "bn":
        return fxcompress.compress(model, example, criterion="bn")
    return fxcompress.compress(model, example)


def tolerance(spec: dict, seed: int, inputs: list[tuple], expected: list[torch.Tensor]) -> float:
    """1e-5, or 4 times the float32 reference's own rounding error (against float64) where the network is so
    ill-conditioned that float32 alone moves its output more (a cancelling sum)."""
    reference = reference_model(spec, seed).double()
    exact = [reference(*(t.double() for t in args)) for args in inputs]
    return max(1e-5, 4 * relative_error(exact, [output.double() for output in expected]))


def check(spec: dict, seed: int = 0) -> float | str:
    """Compress one network as its action says and compare it with its reference on the example and on a
    fresh input. Returns the larger relative error, or the message where the plan pass refused the action with a
    PlanError (a channel group it cannot trace, a block without a shortcut it can tell); raises
    AssertionError on a mismatch, a rolled-back exact rewrite or an approximate one."""
    model, example, other = build(spec, seed)
    inputs = [example, other]
    with torch.no_grad():
        try:
            result = _compress(model, example, spec)
        except fxcompress.PlanError as refusal:
            if _action(spec) in ("remove_channels", "remove_block") and str(refusal).startswith("cannot remove"):
                return str(refusal)
            raise
        assert not result.report.rollbacks, f"exact rewrite rolled back: {result.report.rollbacks} for spec {spec}"
        approximate = [r for r in result.report.approximations if r.pass_name not in PLAN_PASSES]
        assert not approximate, f"approximate rewrite: {approximate}"
        reference = reference_model(spec, seed)
        expected = [reference(*args) for args in inputs]
        error = relative_error(expected, [result.module(*args) for args in inputs])
        if spec.get("backend"):
            torch._dynamo.reset()  # a fresh cache: no fallback to eager after too many recompilations
            compiled = torch.compile(model, backend="depthprune")
            error = max(error, relative_error(expected, [compiled(*args) for args in inputs]))
        limit = tolerance(spec, seed, inputs, expected) if error > 1e-5 else 1e-5
        if error > limit and float64_error(spec, seed) <= FLOAT64_TOLERANCE:
            limit = error  # exact in real arithmetic: the rewritten float32 sums round differently
    assert error <= limit, f"outputs differ by {error:.2e} (tolerance {limit:.1e}) for spec {spec}"
    return error


def float64_error(spec: dict, seed: int) -> float:
    """The relative error of the same compression done in float64 against the float64 reference: about
    1e-15 for a rewrite that is exact in real arithmetic, however ill-conditioned its float32 sums."""
    model, example, other = build(spec, seed)
    model = model.double()
    inputs = [tuple(t.double() for t in args) for args in (example, other)]
    reference = reference_model(spec, seed).double()
    result = _compress(model, inputs[0], spec)
    return relative_error([reference(*args) for args in inputs], [result.module(*args) for args in inputs])
