import math
from dataclasses import dataclass

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
import torch.nn.functional as F

from fxcompress.merge_math import (
    ConvSpec,
    add_parallel_convs,
    compose_conv,
    compose_linear,
    layer_macs,
    conv_output_size,
    densify_groups,
    fold_batchnorm,
    identity_conv,
    regroup,
)

EXACT = {"atol": 1e-10, "rtol": 1e-10}
IN_SIZE_BY_DIMS = {1: 24, 2: 14, 3: 9}


def _choice(gen: torch.Generator, options):
    return options[int(torch.randint(len(options), (1,), generator=gen))]


def _randn(gen: torch.Generator, *shape, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=dtype)


def _random_conv(gen, in_ch, out_ch, kernel, stride, padding, groups, with_bias) -> ConvSpec:
    weight = _randn(gen, out_ch, in_ch // groups, *kernel)
    bias = _randn(gen, out_ch) if with_bias else None
    return ConvSpec(weight, bias, tuple(stride), tuple(padding), groups)


def _with_bias_map(spec: ConvSpec, gen, out_size) -> ConvSpec:
    bias_map = _randn(gen, spec.out_channels, *out_size, dtype=spec.weight.dtype)
    return ConvSpec(spec.weight, spec.bias, spec.stride, spec.padding, spec.groups, bias_map)


@dataclass
class Chain:
    first: ConvSpec
    second: ConvSpec
    in_size: tuple[int, ...]
    mid_size: tuple[int, ...]
    out_size: tuple[int, ...]

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def interior_mask(self) -> torch.Tensor:
        """Outputs whose second-conv window lies entirely inside the intermediate map."""
        masks = []
        for out, mid, k2, s2, p2 in zip(
            self.out_size, self.mid_size, self.second.kernel_size, self.second.stride, self.second.padding
        ):
            o = torch.arange(out)
            masks.append((o * s2 - p2 >= 0) & (o * s2 - p2 + k2 - 1 <= mid - 1))
        return math.prod(torch.meshgrid(*masks, indexing="ij")).bool()


def _random_chain(seed: int, dims: int, kind: str, first_bias_map: bool) -> Chain:
    """kind: 'unpadded' (p2 = 0), 'pointwise_first' (k1 = 1, p2 > 0), 'border' (k1 > 1, p2 > 0)."""
    gen = torch.Generator().manual_seed(seed)
    kernels = (1, 2, 3) if dims == 3 else (1, 2, 3, 4, 5)
    while True:
        k1 = [_choice(gen, kernels) for _ in range(dims)]
        s1 = [_choice(gen, (1, 2, 3)) for _ in range(dims)]
        p1 = [_choice(gen, (0, 1, 2)) for _ in range(dims)]
        k2 = [_choice(gen, kernels) for _ in range(dims)]
        s2 = [_choice(gen, (1, 2, 3)) for _ in range(dims)]
        p2 = [_choice(gen, (0, 1, 2)) for _ in range(dims)]
        if kind == "unpadded":
            p2 = [0] * dims
        elif kind == "pointwise_first":
            k1 = [1] * dims
            p2[0] = _choice(gen, (1, 2))
        else:
            # dim 0 gets a left border that reads real input through the padded intermediate
            s1[0] = _choice(gen, (1, 2))
            k1[0] = _choice(gen, tuple(k for k in (3, 4, 5) if k - 1 - s1[0] >= 0))
            p1[0] = _choice(gen, tuple(range(min(2, k1[0] - 1 - s1[0]) + 1)))
            p2[0] = _choice(gen, (1, 2))
        in_size = (IN_SIZE_BY_DIMS[dims],) * dims
        try:
            mid_size = conv_output_size(in_size, k1, s1, p1)
            out_size = conv_output_size(mid_size, k2, s2, p2)
        except ValueError:
            continue
        in_ch, mid_ch = 4, 4
        out_ch = _choice(gen, (4, 8))
        g1, g2 = _choice(gen, (1, 2, 4)), _choice(gen, (1, 2, 4))
        first_bias = _choice(gen, (True, False)) or kind == "border"
        first = _random_conv(gen, in_ch, mid_ch, k1, s1, p1, g1, with_bias=first_bias)
        second = _random_conv(gen, mid_ch, out_ch, k2, s2, p2, g2, with_bias=_choice(gen, (True, False)))
        if first_bias_map:
            first = _with_bias_map(first, gen, mid_size)
        chain = Chain(first, second, in_size, mid_size, out_size)
        if chain.interior_mask().any():
            return chain


def _check_merged_hyperparameters(chain: Chain, merged: ConvSpec) -> None:
    f, s = chain.first, chain.second
    kernel = tuple(a + (b - 1) * st for a, b, st in zip(f.kernel_size, s.kernel_size, f.stride))
    assert merged.kernel_size == kernel
    assert merged.stride == tuple(a * b for a, b in zip(f.stride, s.stride))
    assert merged.padding == tuple(a + b * st for a, b, st in zip(f.padding, s.padding, f.stride))
    assert merged.groups == math.gcd(f.groups, s.groups)
    assert (merged.in_channels, merged.out_channels) == (f.in_channels, s.out_channels)


DIMS_AND_SEEDS = [(1, seed) for seed in range(12)] + [(2, seed) for seed in range(12)] + [(3, seed) for seed in range(3)]


# ---- ConvSpec, sizes, MACs -------------------------------------------------------------------------------


def test_conv_spec_properties_and_call():
    gen = torch.Generator().manual_seed(0)
    spec = _random_conv(gen, 6, 4, (3, 5), (2, 1), (1, 2), groups=2, with_bias=True)
    assert (spec.in_channels, spec.out_channels, spec.kernel_size, spec.spatial_dims) == (6, 4, (3, 5), 2)
    x = _randn(gen, 2, 6, 9, 7)
    expected = F.conv2d(x, spec.weight, spec.bias, (2, 1), (1, 2), 1, 2)
    torch.testing.assert_close(spec(x), expected, **EXACT)
    with_map = _with_bias_map(spec, gen, expected.shape[2:])
    torch.testing.assert_close(with_map(x), expected + with_map.bias_map, **EXACT)


def test_conv_spec_rejects_inconsistent_fields():
    weight = torch.zeros(4, 2, 3, 3)
    with pytest.raises(ValueError, match="stride"):
        ConvSpec(weight, None, (1,), (0, 0))
    with pytest.raises(ValueError, match="groups"):
        ConvSpec(weight, None, (1, 1), (0, 0), groups=3)
    with pytest.raises(ValueError, match="bias shape"):
        ConvSpec(weight, torch.zeros(3), (1, 1), (0, 0))


@pytest.mark.parametrize(
    ("in_size", "kernel", "stride", "padding", "expected"),
    [
        ((224, 224), (7, 7), (2, 2), (3, 3), (112, 112)),
        ((10,), (3,), (3,), (0,), (3,)),
        ((5, 6, 7), (1, 3, 5), (1, 2, 3), (0, 1, 2), (5, 3, 3)),
    ],
)
def test_conv_output_size_matches_torch(in_size, kernel, stride, padding, expected):
    assert conv_output_size(in_size, kernel, stride, padding) == expected
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(in_size)]
    out = conv(torch.zeros(1, 1, *in_size), torch.zeros(1, 1, *kernel), None, stride, padding)
    assert tuple(out.shape[2:]) == expected


def test_conv_output_size_rejects_oversized_kernel_and_length_mismatch():
    with pytest.raises(ValueError, match="does not fit"):
        conv_output_size((3,), (5,), (1,), (0,))
    with pytest.raises(ValueError, match="same length"):
        conv_output_size((3, 3), (1,), (1,), (0,))


def test_layer_macs_known_cases():
    assert layer_macs((128, 64, 3, 3), (1, 128, 56, 56)) == 128 * 64 * 9 * 3136
    assert layer_macs((32, 1, 3, 3), (1, 32, 112, 112)) == 32 * 9 * 112 * 112  # depthwise: 1 input per group
    assert layer_macs((8, 2, 5), (1, 8, 10)) == 8 * 2 * 5 * 10  # 4 -> 8 channels, 2 groups
    assert layer_macs((10, 20), (3, 7, 10)) == 3 * 7 * 10 * 20  # a linear on [3, 7, 20] tokens


@pytest.mark.parametrize("layer, shape", [(torch.nn.Conv2d(4, 8, 3, stride=2, groups=2), (2, 4, 9, 9)),
                                          (torch.nn.Conv1d(6, 6, 5, padding=2, groups=6), (1, 6, 11)),
                                          (torch.nn.Linear(20, 10), (3, 7, 20))])
def test_layer_macs_match_torch_flop_counter(layer, shape):
    with FlopCounterMode(display=False) as counter:
        output = layer(torch.randn(shape))
    assert 2 * layer_macs(layer.weight.shape, output.shape) == counter.get_total_flops()


# ---- BatchNorm folding, linear composition ---------------------------------------------------------------


def _random_bn(gen, channels, dtype=torch.float64):
    mean = _randn(gen, channels, dtype=dtype)
    var = torch.rand(channels, generator=gen, dtype=dtype) * 1.5 + 0.5
    gamma = _randn(gen, channels, dtype=dtype)
    beta = _randn(gen, channels, dtype=dtype)
    return mean, var, gamma, beta


@pytest.mark.parametrize("layer", ["linear", "conv1d", "conv2d", "conv3d"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fold_batchnorm_matches_eval_batch_norm(layer, with_bias, affine, dtype):
    gen = torch.Generator().manual_seed(0)
    eps = 1e-3
    if layer == "linear":
        weight, x = _randn(gen, 6, 5, dtype=dtype), _randn(gen, 7, 5, dtype=dtype)
        apply = F.linear
    else:
        dims = int(layer[4])
        weight, x = _randn(gen, 6, 5, *(3,) * dims, dtype=dtype), _randn(gen, 2, 5, *(6,) * dims, dtype=dtype)
        apply = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    bias = _randn(gen, 6, dtype=dtype) if with_bias else None
    mean, var, gamma, beta = _random_bn(gen, 6, dtype)
    if not affine:
        gamma = beta = None
    expected = F.batch_norm(apply(x, weight, bias), mean, var, gamma, beta, training=False, eps=eps)
    folded_weight, folded_bias = fold_batchnorm(weight, bias, mean, var, gamma, beta, eps)
    tolerance = EXACT if dtype == torch.float64 else {"atol": 1e-4, "rtol": 1e-4}
    torch.testing.assert_close(apply(x, folded_weight, folded_bias), expected, **tolerance)


def test_fold_batchnorm_rejects_wrong_stat_shape():
    with pytest.raises(ValueError, match="running_var"):
        fold_batchnorm(torch.ones(4, 2), None, torch.zeros(4), torch.ones(3), None, None, 1e-5)


@pytest.mark.parametrize("b1_present", [True, False])
@pytest.mark.parametrize("b2_present", [True, False])
def test_compose_linear_matches_sequential(b1_present, b2_present):
    gen = torch.Generator().manual_seed(3)
    w1, w2, x = _randn(gen, 7, 5), _randn(gen, 3, 7), _randn(gen, 4, 5)
    b1 = _randn(gen, 7) if b1_present else None
    b2 = _randn(gen, 3) if b2_present else None
    weight, bias = compose_linear(w1, b1, w2, b2)
    assert (bias is None) == (not b1_present and not b2_present)
    torch.testing.assert_close(F.linear(x, weight, bias), F.linear(F.linear(x, w1, b1), w2, b2), **EXACT)


def test_compose_linear_rejects_mismatched_features():
    with pytest.raises(ValueError, match="features"):
        compose_linear(torch.ones(7, 5), None, torch.ones(3, 6), None)


# ---- groups ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channels_in", "channels_out", "groups"), [(4, 6, 1), (4, 6, 2), (6, 6, 6), (8, 4, 4), (3, 9, 3)]
)
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_densify_groups_matches_grouped_conv_and_round_trips(channels_in, channels_out, groups, dims):
    gen = torch.Generator().manual_seed(channels_in * 100 + groups * 10 + dims)
    spec = _random_conv(gen, channels_in, channels_out, (3,) * dims, (1,) * dims, (1,) * dims, groups, True)
    dense = densify_groups(spec.weight, groups)
    assert dense.shape == (channels_out, channels_in, *(3,) * dims)
    x = _randn(gen, 2, channels_in, *(5,) * dims)
    dense_spec = ConvSpec(dense, spec.bias, spec.stride, spec.padding, 1)
    torch.testing.assert_close(dense_spec(x), spec(x), **EXACT)
    assert torch.equal(regroup(dense, groups), spec.weight)


def test_regroup_rejects_off_block_entries():
    dense = densify_groups(torch.randn(4, 1, 3, 3, dtype=torch.float64), 4)
    regroup(dense, 2)
    dense[0, 3, 1, 1] = 1e-30
    with pytest.raises(ValueError, match="diagonal blocks"):
        regroup(dense, 2)
    assert regroup(dense, 1).shape == dense.shape


def test_regroup_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="groups=3"):
        regroup(torch.zeros(4, 4, 1), 3)


# ---- compose_conv ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["unpadded", "pointwise_first"])
@pytest.mark.parametrize("first_bias_map", [False, True])
@pytest.mark.parametrize(("dims", "seed"), DIMS_AND_SEEDS)
def test_compose_conv_exact_cases_match_everywhere(kind, first_bias_map, dims, seed):
    chain = _random_chain(seed, dims, kind, first_bias_map)
    merged, exact = compose_conv(chain.first, chain.second, chain.mid_size, in_size=chain.in_size)
    assert exact
    _check_merged_hyperparameters(chain, merged)
    x = _randn(torch.Generator().manual_seed(seed), 2, 4, *chain.in_size)
    torch.testing.assert_close(merged(x), chain.reference(x), **EXACT)


@pytest.mark.parametrize("first_bias_map", [False, True])
@pytest.mark.parametrize(("dims", "seed"), DIMS_AND_SEEDS)
def test_compose_conv_border_case_is_exact_only_in_the_interior(first_bias_map, dims, seed):
    chain = _random_chain(seed, dims, "border", first_bias_map)
    merged, exact = compose_conv(chain.first, chain.second, chain.mid_size)
    assert not exact
    _check_merged_hyperparameters(chain, merged)
    x = _randn(torch.Generator().manual_seed(seed), 2, 4, *chain.in_size)
    got, expected = merged(x), chain.reference(x)
    interior = chain.interior_mask()
    torch.testing.assert_close(got[..., interior], expected[..., interior], **EXACT)
    assert (got - expected)[..., ~interior].abs().max() > 1e-6


@pytest.mark.parametrize("first_bias_map", [False, True])
@pytest.mark.parametrize(("dims", "seed"), DIMS_AND_SEEDS)
def test_compose_conv_border_case_bias_terms_are_exact(first_bias_map, dims, seed):
    chain = _random_chain(seed, dims, "border", first_bias_map)
    merged, _ = compose_conv(chain.first, chain.second, chain.mid_size)
    zeros = torch.zeros(1, 4, *chain.in_size, dtype=torch.float64)
    torch.testing.assert_close(merged(zeros), chain.reference(zeros), **EXACT)


def _as_dtype(spec: ConvSpec, dtype: torch.dtype) -> ConvSpec:
    def convert(t):
        return None if t is None else t.to(dtype)

    weight, bias, bias_map = convert(spec.weight), convert(spec.bias), convert(spec.bias_map)
    return ConvSpec(weight, bias, spec.stride, spec.padding, spec.groups, bias_map)


@pytest.mark.parametrize("kind", ["unpadded", "pointwise_first", "border"])
def test_compose_conv_float32(kind):
    chain = _random_chain(5, 2, kind, first_bias_map=True)
    first, second = _as_dtype(chain.first, torch.float32), _as_dtype(chain.second, torch.float32)
    merged, _ = compose_conv(first, second, chain.mid_size)
    assert merged.weight.dtype == torch.float32
    x = torch.randn(2, 4, *chain.in_size, generator=torch.Generator().manual_seed(0))
    interior = chain.interior_mask()
    torch.testing.assert_close(merged(x)[..., interior], second(first(x))[..., interior], atol=1e-3, rtol=1e-4)


def _inverted_residual(gen, dims, in_ch, hidden, out_ch, stride):
    expand = _random_conv(gen, in_ch, hidden, (1,) * dims, (1,) * dims, (0,) * dims, 1, True)
    depthwise = _random_conv(gen, hidden, hidden, (3,) * dims, (stride,) * dims, (1,) * dims, hidden, True)
    project = _random_conv(gen, hidden, out_ch, (1,) * dims, (1,) * dims, (0,) * dims, 1, True)
    return expand, depthwise, project


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [7, 8])
def test_linearised_inverted_residual_is_one_exact_dense_3x3(dims, stride, size):
    gen = torch.Generator().manual_seed(dims * 10 + stride + size)
    expand, depthwise, project = _inverted_residual(gen, dims, 4, 24, 6, stride)
    in_size = (size,) * dims
    expanded, exact_first = compose_conv(expand, depthwise, in_size, in_size=in_size)
    dw_out = conv_output_size(in_size, (3,) * dims, (stride,) * dims, (1,) * dims)
    merged, exact_second = compose_conv(expanded, project, dw_out)
    assert exact_first and exact_second
    hyperparameters = (merged.kernel_size, merged.stride, merged.padding, merged.groups)
    assert hyperparameters == ((3,) * dims, (stride,) * dims, (1,) * dims, 1)
    assert merged.bias_map is not None
    x = _randn(gen, 2, 4, *in_size)
    torch.testing.assert_close(merged(x), project(depthwise(expand(x))), **EXACT)


def test_two_depthwise_3x3_compose_to_depthwise_5x5():
    gen = torch.Generator().manual_seed(11)
    first = _random_conv(gen, 8, 8, (3, 3), (1, 1), (1, 1), 8, True)
    second = _random_conv(gen, 8, 8, (3, 3), (1, 1), (1, 1), 8, True)
    merged, exact = compose_conv(first, second, (10, 10))
    assert (merged.kernel_size, merged.padding, merged.groups, exact) == ((5, 5), (2, 2), 8, False)
    assert merged.weight.shape == (8, 1, 5, 5)
    x = _randn(gen, 1, 8, 10, 10)
    torch.testing.assert_close(merged(x)[..., 1:-1, 1:-1], second(first(x))[..., 1:-1, 1:-1], **EXACT)


def test_compose_conv_rejects_inconsistent_sizes_and_channels():
    gen = torch.Generator().manual_seed(2)
    first = _random_conv(gen, 4, 6, (3,), (2,), (1,), 1, True)
    second = _random_conv(gen, 6, 4, (3,), (1,), (1,), 2, True)
    compose_conv(first, second, (5,), in_size=(10,))
    with pytest.raises(ValueError, match="mid_size"):
        compose_conv(first, second, (6,), in_size=(10,))
    with pytest.raises(ValueError, match="channels"):
        compose_conv(second, second, (5,))
    with pytest.raises(ValueError, match="bias_map"):
        compose_conv(_with_bias_map(first, gen, (4,)), second, (5,))


# ---- add_parallel_convs ----------------------------------------------------------------------------------


def _random_parallel_pair(seed: int, dims: int):
    gen = torch.Generator().manual_seed(seed)
    kernels = (1, 2, 3) if dims == 3 else (1, 2, 3, 4, 5)
    in_size = (IN_SIZE_BY_DIMS[dims],) * dims
    while True:
        stride = [_choice(gen, (1, 2, 3)) for _ in range(dims)]
        ka, kb = ([_choice(gen, kernels) for _ in range(dims)] for _ in range(2))
        pa, pb = ([_choice(gen, (0, 1, 2)) for _ in range(dims)] for _ in range(2))
        try:
            out_size = conv_output_size(in_size, ka, stride, pa)
            if conv_output_size(in_size, kb, stride, pb) != out_size or (ka, pa) == (kb, pb):
                continue
        except ValueError:
            continue
        ga, gb = _choice(gen, (1, 2, 4)), _choice(gen, (1, 2, 4))
        a = _random_conv(gen, 4, 8, ka, stride, pa, ga, _choice(gen, (True, False)))
        b = _random_conv(gen, 4, 8, kb, stride, pb, gb, _choice(gen, (True, False)))
        a, b = (_with_bias_map(c, gen, out_size) if _choice(gen, (True, False)) else c for c in (a, b))
        return a, b, in_size


@pytest.mark.parametrize(("dims", "seed"), DIMS_AND_SEEDS)
def test_add_parallel_convs_matches_sum(dims, seed):
    a, b, in_size = _random_parallel_pair(seed, dims)
    merged = add_parallel_convs(a, b, in_size)
    assert merged.groups == math.gcd(a.groups, b.groups)
    assert merged.padding == tuple(max(p, q) for p, q in zip(a.padding, b.padding))
    x = _randn(torch.Generator().manual_seed(seed), 2, 4, *in_size)
    torch.testing.assert_close(merged(x), a(x) + b(x), **EXACT)


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_identity_shortcut_lands_on_kernel_centre(groups, dims):
    gen = torch.Generator().manual_seed(groups + dims)
    conv = _random_conv(gen, 4, 4, (3,) * dims, (1,) * dims, (1,) * dims, groups, True)
    shortcut = identity_conv(4, dims, dtype=torch.float64)
    x = _randn(gen, 2, 4, *(6,) * dims)
    torch.testing.assert_close(shortcut(x), x, **EXACT)
    merged = add_parallel_convs(conv, shortcut, (6,) * dims)
    assert (merged.kernel_size, merged.groups) == ((3,) * dims, groups)
    added = densify_groups(merged.weight, groups) - densify_groups(conv.weight, groups)
    expected = torch.zeros_like(added)
    expected[(slice(None), slice(None), *(1,) * dims)] = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(added, expected, **EXACT)
    torch.testing.assert_close(merged(x), conv(x) + x, **EXACT)


@pytest.mark.parametrize("size", [7, 8])
def test_downsample_shortcut_adds_into_strided_3x3(size):
    gen = torch.Generator().manual_seed(size)
    main = _random_conv(gen, 4, 8, (3, 3), (2, 2), (1, 1), 1, False)
    main = ConvSpec(*fold_batchnorm(main.weight, None, *_random_bn(gen, 8), 1e-5), (2, 2), (1, 1))
    down = _random_conv(gen, 4, 8, (1, 1), (2, 2), (0, 0), 1, False)
    down = ConvSpec(*fold_batchnorm(down.weight, None, *_random_bn(gen, 8), 1e-5), (2, 2), (0, 0))
    merged = add_parallel_convs(main, down, (size, size))
    assert (merged.kernel_size, merged.stride, merged.padding) == ((3, 3), (2, 2), (1, 1))
    centre_tap = main.weight[:, :, 1, 1] + down.weight[:, :, 0, 0]
    torch.testing.assert_close(merged.weight[:, :, 1, 1], centre_tap, **EXACT)
    x = _randn(gen, 2, 4, size, size)
    torch.testing.assert_close(merged(x), main(x) + down(x), **EXACT)


def test_add_parallel_convs_rejects_mismatches():
    gen = torch.Generator().manual_seed(9)
    a = _random_conv(gen, 4, 4, (3,), (1,), (1,), 1, True)
    with pytest.raises(ValueError, match="strides"):
        add_parallel_convs(a, _random_conv(gen, 4, 4, (3,), (2,), (1,), 1, True), (8,))
    with pytest.raises(ValueError, match="channels"):
        add_parallel_convs(a, _random_conv(gen, 4, 6, (3,), (1,), (1,), 1, True), (8,))
    with pytest.raises(ValueError, match="output sizes"):
        add_parallel_convs(a, _random_conv(gen, 4, 4, (3,), (1,), (0,), 1, True), (8,))
