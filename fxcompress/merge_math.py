"""Tensor math that merges chains and sums of linear operators into one operator: the specs of a conv and a
linear, their arithmetic and their cost in multiply-accumulates. No FX here (`layers.py` reads and writes
specs as graph nodes)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

_CONV_BY_DIMS: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv_function(spatial_dims: int) -> Callable[..., Tensor]:
    if spatial_dims not in _CONV_BY_DIMS:
        raise ValueError(f"only 1, 2 or 3 spatial dims are supported, got {spatial_dims}")
    return _CONV_BY_DIMS[spatial_dims]


@dataclass(frozen=True, eq=False)
class LinearSpec:
    """y = x weight^T + bias."""

    weight: Tensor  # [out, in]
    bias: Tensor | None


@dataclass(frozen=True, eq=False)
class ConvSpec:
    """y = conv(x, weight, bias, stride, padding, dilation, groups) + bias_map; dilation () means all 1."""

    weight: Tensor
    bias: Tensor | None
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    groups: int = 1
    bias_map: Tensor | None = None
    dilation: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _conv_function(self.spatial_dims)
        object.__setattr__(self, "stride", tuple(int(s) for s in self.stride))
        object.__setattr__(self, "padding", tuple(int(p) for p in self.padding))
        object.__setattr__(self, "dilation", tuple(int(d) for d in self.dilation) or (1,) * self.spatial_dims)
        if {len(self.stride), len(self.padding), len(self.dilation)} != {self.spatial_dims}:
            raise ValueError(f"stride {self.stride}, padding {self.padding} and dilation {self.dilation} need "
                             f"{self.spatial_dims} entries each")
        if self.is_dilated and self.bias_map is not None:
            raise ValueError("a bias_map comes from merging dilation-1 convs; this conv is dilated")
        if self.groups < 1 or self.out_channels % self.groups:
            raise ValueError(f"groups={self.groups} must divide out_channels={self.out_channels}")
        if self.bias is not None and tuple(self.bias.shape) != (self.out_channels,):
            raise ValueError(f"bias shape {tuple(self.bias.shape)} != ({self.out_channels},)")
        if self.bias_map is not None and (
            self.bias_map.dim() != self.spatial_dims + 1 or self.bias_map.shape[0] != self.out_channels
        ):
            raise ValueError(
                f"bias_map shape {tuple(self.bias_map.shape)} must be [{self.out_channels}, *out_spatial]"
            )

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def spatial_dims(self) -> int:
        return self.weight.dim() - 2

    @property
    def is_dilated(self) -> bool:
        return any(d != 1 for d in self.dilation)

    def __call__(self, x: Tensor) -> Tensor:
        conv = _conv_function(self.spatial_dims)
        y = conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return y if self.bias_map is None else y + self.bias_map

    def check_bias_map(self, out_size: Sequence[int]) -> None:
        """Raise ValueError unless bias_map is absent or shaped [out_channels, *out_size]."""
        expected = (self.out_channels, *out_size)
        if self.bias_map is not None and tuple(self.bias_map.shape) != expected:
            raise ValueError(f"bias_map shape {tuple(self.bias_map.shape)} != {expected}")

    def without_bias(self) -> ConvSpec:
        """The same convolution with neither bias nor bias_map: its purely linear part."""
        return ConvSpec(self.weight, None, self.stride, self.padding, self.groups, dilation=self.dilation)

    def with_weights(self, weight: Tensor, bias: Tensor | None, bias_map: Tensor | None = None) -> ConvSpec:
        """The same convolution (stride, padding, dilation, groups) with new weights."""
        return ConvSpec(weight, bias, self.stride, self.padding, self.groups, bias_map, self.dilation)


def numeric_padding(
    padding: str, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]
) -> tuple[int, ...]:
    """The symmetric padding equal to padding="valid" or "same"; ValueError where there is none."""
    if padding == "valid":
        return (0,) * len(kernel)
    if padding != "same":
        raise ValueError(f"padding={padding!r} is not 'same' or 'valid'")
    if any(s != 1 for s in stride):
        raise ValueError(f"padding='same' with stride {tuple(stride)} (needs stride 1)")
    total = [d * (k - 1) for k, d in zip(kernel, dilation)]
    if any(t % 2 for t in total):
        raise ValueError(f"padding='same' with kernel {tuple(kernel)} and dilation {tuple(dilation)} pads "
                         "asymmetrically (even kernel)")
    return tuple(t // 2 for t in total)


def _require_dilation_one(*specs: ConvSpec) -> None:
    for spec in specs:
        if spec.is_dilated:
            raise ValueError(f"dilated convolution (dilation {spec.dilation}): merging needs dilation 1")


def conv_output_size(
    in_size: Sequence[int], kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int]
) -> tuple[int, ...]:
    """Spatial output size of a dilation-1 convolution."""
    if not len(in_size) == len(kernel) == len(stride) == len(padding):
        raise ValueError(
            f"in_size {tuple(in_size)}, kernel {tuple(kernel)}, stride {tuple(stride)} and "
            f"padding {tuple(padding)} must have the same length"
        )
    out = tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip(in_size, kernel, stride, padding))
    if min(out, default=1) < 1:
        raise ValueError(
            f"kernel {tuple(kernel)} does not fit input {tuple(in_size)} padded by {tuple(padding)}"
        )
    return out


def _per_output_channel(values: Tensor, like: Tensor) -> Tensor:
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def batchnorm_scale(running_var: Tensor, gamma: Tensor | None, eps: float) -> Tensor:
    """s = gamma / sqrt(var + eps), per channel: what an eval-mode BatchNorm multiplies its input by."""
    scale = torch.rsqrt(running_var + eps)
    return scale if gamma is None else scale * gamma


def fold_batchnorm(
    weight: Tensor,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm into the conv or linear before it (output channels = dim 0)."""
    channels = weight.shape[0]
    per_channel = {
        "bias": bias, "running_mean": running_mean, "running_var": running_var, "gamma": gamma, "beta": beta
    }
    for name, stat in per_channel.items():
        if stat is not None and tuple(stat.shape) != (channels,):
            raise ValueError(f"{name} shape {tuple(stat.shape)} != ({channels},)")
    scale = batchnorm_scale(running_var, gamma, eps)
    shifted_bias = -running_mean if bias is None else bias - running_mean
    folded_bias = scale * shifted_bias
    if beta is not None:
        folded_bias = folded_bias + beta
    return weight * _per_output_channel(scale, weight), folded_bias


def fold_batchnorm_into(
    spec: ConvSpec | LinearSpec,
    running_mean: Tensor,
    running_var: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    eps: float,
) -> ConvSpec | LinearSpec:
    """`spec` followed by an eval-mode BatchNorm as one spec; a conv's bias map is scaled like its output."""
    weight, bias = fold_batchnorm(spec.weight, spec.bias, running_mean, running_var, gamma, beta, eps)
    if isinstance(spec, LinearSpec):
        return LinearSpec(weight, bias)
    bias_map = spec.bias_map
    if bias_map is not None:
        bias_map = bias_map * _per_output_channel(batchnorm_scale(running_var, gamma, eps), bias_map)
    return spec.with_weights(weight, bias, bias_map)


def compose_linear(
    w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """y = W2 (W1 x + b1) + b2 as one linear map (W, b)."""
    if w2.shape[1] != w1.shape[0]:
        raise ValueError(f"second weight takes {w2.shape[1]} features, first produces {w1.shape[0]}")
    bias = None if b1 is None else w2 @ b1
    if b2 is not None:
        bias = b2 if bias is None else bias + b2
    return w2 @ w1, bias


def _group_sizes(out_channels: int, in_channels: int, groups: int) -> tuple[int, int]:
    if groups < 1 or out_channels % groups or in_channels % groups:
        raise ValueError(
            f"groups={groups} must divide out_channels={out_channels} and in_channels={in_channels}"
        )
    return out_channels // groups, in_channels // groups


def densify_groups(weight: Tensor, groups: int) -> Tensor:
    """Grouped weight [Cout, Cin/groups, *k] -> block-diagonal dense weight [Cout, Cin, *k]."""
    out_channels, in_per_group = weight.shape[:2]
    out_per_group, _ = _group_sizes(out_channels, in_per_group * groups, groups)
    dense = weight.new_zeros(out_channels, in_per_group * groups, *weight.shape[2:])
    for g in range(groups):
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        dense[rows, g * in_per_group : (g + 1) * in_per_group] = weight[rows]
    return dense


def regroup(dense_weight: Tensor, groups: int) -> Tensor:
    """Block-diagonal dense weight [Cout, Cin, *k] -> grouped weight [Cout, Cin/groups, *k]."""
    out_channels, in_channels = dense_weight.shape[:2]
    out_per_group, in_per_group = _group_sizes(out_channels, in_channels, groups)
    grouped = torch.cat([
        dense_weight[g * out_per_group : (g + 1) * out_per_group, g * in_per_group : (g + 1) * in_per_group]
        for g in range(groups)
    ])
    if densify_groups(grouped, groups).ne(dense_weight).any():
        raise ValueError(f"weight has nonzero entries outside the {groups} diagonal blocks")
    return grouped


def _sum_optional(*terms: Tensor | None) -> Tensor | None:
    present = [t for t in terms if t is not None]
    return sum(present[1:], present[0]) if present else None


def _composite_kernel(w1: Tensor, w2: Tensor, first_stride: Sequence[int]) -> Tensor:
    """W[o,i,u] = sum_m sum_j W2[o,m,j] * W1[m,i,u - j*s1] for dense W1, W2."""
    k1, k2 = w1.shape[2:], w2.shape[2:]
    kernel = [a + (b - 1) * s for a, b, s in zip(k1, k2, first_stride)]
    merged = w1.new_zeros(w2.shape[0], w1.shape[1], *kernel)
    for tap in itertools.product(*(range(k) for k in k2)):
        window = tuple(slice(j * s, j * s + k) for j, s, k in zip(tap, first_stride, k1))
        tap_weight = w2[(slice(None), slice(None), *tap)]
        merged[(slice(None), slice(None), *window)] += torch.einsum("om,mi...->oi...", tap_weight, w1)
    return merged


def _border_bias_correction(
    first_bias: Tensor, second: ConvSpec, mid_size: Sequence[int], tap_sums: Tensor
) -> Tensor:
    """Zero-padded minus extended constant-b1 intermediate, pushed through second's linear part."""
    constant_map = first_bias.reshape(-1, *([1] * len(mid_size))).expand(-1, *mid_size)
    zero_padded = second.without_bias()(constant_map.unsqueeze(0)).squeeze(0)
    extended = tap_sums @ first_bias
    return zero_padded - extended.reshape(-1, *([1] * len(mid_size)))


def compose_conv(
    first: ConvSpec, second: ConvSpec, mid_size: Sequence[int], *, in_size: Sequence[int] | None = None
) -> tuple[ConvSpec, bool]:
    """second(first(x)) as one conv; `exact` is False when the output border ring may differ.

    mid_size is the spatial size of first's output; in_size, when given, is checked against it.
    """
    _require_dilation_one(first, second)
    if first.spatial_dims != second.spatial_dims:
        raise ValueError(f"first has {first.spatial_dims} spatial dims, second has {second.spatial_dims}")
    if second.in_channels != first.out_channels:
        raise ValueError(f"second takes {second.in_channels} channels, first produces {first.out_channels}")
    if len(mid_size) != first.spatial_dims:
        raise ValueError(f"mid_size {tuple(mid_size)} needs {first.spatial_dims} entries")
    if in_size is not None:
        expected_mid = conv_output_size(in_size, first.kernel_size, first.stride, first.padding)
        if expected_mid != tuple(mid_size):
            raise ValueError(
                f"first maps in_size {tuple(in_size)} to {expected_mid}, not mid_size {tuple(mid_size)}"
            )
    first.check_bias_map(mid_size)
    second.check_bias_map(conv_output_size(mid_size, second.kernel_size, second.stride, second.padding))
    w1 = densify_groups(first.weight, first.groups)
    w2 = densify_groups(second.weight, second.groups)
    tap_sums = w2.sum(dim=tuple(range(2, w2.dim())))
    second_padded = any(p > 0 for p in second.padding)

    bias = second.bias if first.bias is None else _sum_optional(tap_sums @ first.bias, second.bias)
    correction = None
    if second_padded and first.bias is not None:
        correction = _border_bias_correction(first.bias, second, mid_size, tap_sums)
    propagated = None
    if first.bias_map is not None:
        propagated = second.without_bias()(first.bias_map.unsqueeze(0)).squeeze(0)

    groups = math.gcd(first.groups, second.groups)
    merged = ConvSpec(
        weight=regroup(_composite_kernel(w1, w2, first.stride), groups),
        bias=bias,
        stride=tuple(a * b for a, b in zip(first.stride, second.stride)),
        padding=tuple(p1 + p2 * s1 for p1, p2, s1 in zip(first.padding, second.padding, first.stride)),
        groups=groups,
        bias_map=_sum_optional(correction, propagated, second.bias_map),
    )
    exact = not second_padded or all(k == 1 for k in first.kernel_size)
    return merged, exact


def identity_conv(
    channels: int, spatial_dims: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> ConvSpec:
    """Dirac 1x1 conv (depthwise, stride 1, padding 0, no bias) that returns its input."""
    _conv_function(spatial_dims)
    weight = torch.ones(channels, 1, *([1] * spatial_dims), dtype=dtype, device=device)
    return ConvSpec(weight, None, (1,) * spatial_dims, (0,) * spatial_dims, groups=channels)


def _place_kernel(dense_weight: Tensor, offset: Sequence[int], kernel: Sequence[int]) -> Tensor:
    placed = dense_weight.new_zeros(*dense_weight.shape[:2], *kernel)
    window = tuple(slice(o, o + k) for o, k in zip(offset, dense_weight.shape[2:]))
    placed[(slice(None), slice(None), *window)] = dense_weight
    return placed


def add_parallel_convs(a: ConvSpec, b: ConvSpec, in_size: Sequence[int]) -> ConvSpec:
    """a(x) + b(x) as one conv, exact, for inputs of spatial size in_size."""
    _require_dilation_one(a, b)
    if a.spatial_dims != b.spatial_dims:
        raise ValueError(f"spatial dims differ: {a.spatial_dims} vs {b.spatial_dims}")
    if a.stride != b.stride:
        raise ValueError(f"strides differ: {a.stride} vs {b.stride}")
    if (a.in_channels, a.out_channels) != (b.in_channels, b.out_channels):
        raise ValueError(
            f"channels differ: {a.in_channels}->{a.out_channels} vs {b.in_channels}->{b.out_channels}"
        )
    out_a = conv_output_size(in_size, a.kernel_size, a.stride, a.padding)
    out_b = conv_output_size(in_size, b.kernel_size, b.stride, b.padding)
    if out_a != out_b:
        raise ValueError(f"output sizes differ on input {tuple(in_size)}: {out_a} vs {out_b}")
    a.check_bias_map(out_a)
    b.check_bias_map(out_b)
    padding = tuple(max(pa, pb) for pa, pb in zip(a.padding, b.padding))
    reach = (max(ka - pa, kb - pb) for ka, pa, kb, pb in zip(a.kernel_size, a.padding, b.kernel_size, b.padding))
    kernel = tuple(p + r for p, r in zip(padding, reach))
    dense_sum = sum(
        _place_kernel(densify_groups(c.weight, c.groups), [p - pc for p, pc in zip(padding, c.padding)], kernel)
        for c in (a, b)
    )
    groups = math.gcd(a.groups, b.groups)
    return ConvSpec(
        weight=regroup(dense_sum, groups),
        bias=_sum_optional(a.bias, b.bias),
        stride=a.stride,
        padding=padding,
        groups=groups,
        bias_map=_sum_optional(a.bias_map, b.bias_map),
    )


def layer_macs(weight_shape: Sequence[int], output_shape: Sequence[int]) -> int:
    """Multiply-accumulates of a conv or linear: each output element reads one weight row (in_channels / groups
    times the kernel for a conv, in_features for a linear)."""
    return math.prod(output_shape) * math.prod(weight_shape[1:])
