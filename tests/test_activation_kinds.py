"""The BatchNorm criterion per activation kind: only an output that is really 0 may be removed or zeroed,
and only a channel that is really the identity may be linearised; everything else is refused with a reason."""
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.ops import activation_regions, bind
from fxcompress.planner import find_plan
from helpers import CAPTURES, relative_error

OFF_1, OFF_2 = [1, 4, 6], [0, 3]
x = (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),)


def confident_bn(channels: int, off: list[int], on_value: float, off_value: float) -> nn.BatchNorm2d:
    """BatchNorm whose output is beta +- 1e-3: `off_value` on the channels in `off`, `on_value` elsewhere."""
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.fill_(1e-3)
        bn.bias.copy_(torch.tensor([off_value if c in off else on_value for c in range(channels)]))
        bn.running_mean.normal_(0, 0.3)
        bn.running_var.uniform_(0.5, 2)
    return bn


def net(activation, off_1=OFF_1, off_2=OFF_2, on_value=0.5, off_value=-3.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), confident_bn(8, off_1, on_value, off_value), activation(),
                         nn.Conv2d(8, 6, 1), confident_bn(6, off_2, on_value, off_value), activation(),
                         nn.Conv2d(6, 4, 3, padding=1)).eval()


KINDS = {"hardtanh": lambda: nn.Hardtanh(-1.0, 1.0), "leaky_relu": lambda: nn.LeakyReLU(0.2),
         "gelu": nn.GELU, "silu": nn.SiLU, "hardswish": nn.Hardswish}
OFF_REASONS = {"hardtanh": "output the constant -1.0", "leaky_relu": "output 0.2 * z"}


def compressed_error(model) -> tuple[float, fxcompress.api.CompressResult]:
    result = fxcompress.compress(model, x, criterion="bn", max_error=1e-6)
    with torch.no_grad():
        return relative_error(model(*x), result.module(*x)), result


@pytest.mark.parametrize("kind", ["hardtanh", "leaky_relu"])
def test_off_channels_that_are_not_zero_are_refused_and_the_result_stays_exact(kind):
    model = net(KINDS[kind])
    error, result = compressed_error(model)
    assert error <= 1e-5
    assert result.plan.decisions == ()
    refused = find_plan(model, x, criterion="bn", max_error=1e-6).refused
    name = f"2:{kind}"
    assert OFF_REASONS[kind] in refused[name], refused[name]


@pytest.mark.parametrize("kind", ["hardtanh", "leaky_relu"])
def test_layers_whose_channels_are_all_in_the_identity_range_are_still_linearised_exactly(kind):
    model = net(KINDS[kind], off_1=[], off_2=[])
    error, result = compressed_error(model)
    assert error <= 1e-5
    assert result.plan.targets("linearize") == [f"2:{kind}", f"5:{kind}"]
    assert result.report.after.activations == 0


@pytest.mark.parametrize("kind", ["gelu", "silu", "hardswish"])
def test_activations_only_approximately_off_or_linear_are_refused(kind):
    model = net(KINDS[kind], off_value=-6.0, on_value=6.0)
    result = find_plan(model, x, criterion="bn", max_error=1e-6)
    assert result.plan.decisions == ()
    assert "only approximately" in result.refused[f"2:{kind}"]


@pytest.mark.parametrize("activation, name", [(nn.ReLU, "relu"), (nn.ReLU6, "hardtanh")])
def test_relu_and_relu6_off_channels_are_still_removed_exactly(activation, name):
    model = net(activation)
    result = find_plan(model, x, criterion="bn", max_error=1e-6)
    assert [(d.action, d.target, d.params) for d in result.plan.decisions] == [
        ("remove_channels", f"2:{name}", {"channels": OFF_1}), ("linearize", f"2:{name}", {}),
        ("remove_channels", f"5:{name}", {"channels": OFF_2}), ("linearize", f"5:{name}", {})]
    error, compressed = compressed_error(model)
    assert error <= 1e-5 and compressed.report.after.activations == 0


@pytest.mark.parametrize("kind", ["hardtanh", "leaky_relu"])
def test_backend_criterion_is_exact_on_activations_whose_off_value_is_not_zero(kind):
    model = net(KINDS[kind])
    compiled = torch.compile(model, backend="depthprune", options={"criterion": "bn", "max_error": 1e-6,
                                                                    "lowering": "eager"})
    with torch.no_grad():
        assert relative_error(model(*x), compiled(*x)) <= 1e-5


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("activation, expected", [
    (nn.ReLU(), (0.0, float("inf"), "zero", 0.0)),
    (nn.ReLU6(), (0.0, 6.0, "zero", 0.0)),
    (nn.Hardtanh(-1.0, 2.0), (-1.0, 2.0, "constant", -1.0)),
    (nn.LeakyReLU(0.2), (0.0, float("inf"), "linear", 0.2)),
    (nn.LeakyReLU(), (0.0, float("inf"), "linear", 0.01)),
    (nn.GELU(), (0.0, float("inf"), "approximately zero", 0.0)),
])
def test_activation_regions_are_read_from_both_capture_dialects(capture, activation, expected):
    gm, _ = CAPTURES[capture](nn.Sequential(nn.Conv2d(3, 3, 1), activation).eval(), x)
    calls = [bind(n) for n in gm.graph.nodes if bind(n) is not None and bind(n).kind == "activation"]
    regions = activation_regions(calls[0])
    assert (regions.low, regions.high, regions.below, regions.value) == expected
