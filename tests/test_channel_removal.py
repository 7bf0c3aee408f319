"""remove_channels across residual adds (ResNet-18), inverted residuals (MobileNetV2) and concatenations:
outputs equal the reference with the channels zeroed at every consumer's input; refusals name the reason."""
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.config import CompressConfig
from fxcompress.passes import PLAN_ACTIONS
from fxcompress.pipeline import Pipeline
from fxcompress.plan import Decision, Plan
from helpers import CAPTURES, relative_error, torchvision_model

capture_methods = pytest.mark.parametrize("capture", CAPTURES)
CHANNELS = [3, 10]


def first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def masked(model: nn.Module, consumers: list[str], channels: list[int]) -> nn.Module:
    """The reference: `channels` of the input of each consumer module zeroed by a pre-hook."""
    def zero(module, args):
        x = args[0].clone()
        x[:, channels] = 0
        return (x,) + args[1:]

    for name in consumers:
        model.get_submodule(name).register_forward_pre_hook(zero)
    return model


def removed(capture, model, inputs, target, channels=CHANNELS):
    gm, runtime = CAPTURES[capture](model, inputs)
    plan = Plan((Decision("remove_channels", target, {"channels": channels}),))
    pipeline = Pipeline(gm, runtime, CompressConfig(), plan)
    pipeline.run_pass(PLAN_ACTIONS["remove_channels"].apply, verify=False)
    rewrites = {r.sources[0]: r.detail for r in pipeline.report.rewrites}
    return pipeline.state.gm, runtime, rewrites


@pytest.mark.parametrize("capture", ["export", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_across_resnet18_residual_adds(capture):
    model = torchvision_model("resnet18")
    inputs = (torch.randn(2, 3, 32, 32),)
    gm, runtime, rewrites = removed(capture, model, inputs, "layer1.0.relu:relu#1")
    assert rewrites == {
        **{name: "2 output channels removed" for name in ("conv1:conv", "bn1:batch_norm", "layer1.0.conv2:conv",
                                                           "layer1.0.bn2:batch_norm", "layer1.1.conv2:conv",
                                                           "layer1.1.bn2:batch_norm")},
        **{name: "2 input channels removed" for name in ("layer1.0.conv1:conv", "layer1.1.conv1:conv",
                                                          "layer2.0.conv1:conv", "layer2.0.downsample.0:conv")}}
    reference = masked(model, ["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"],
                       CHANNELS)
    with torch.no_grad():
        assert relative_error(reference(*inputs), first(gm(*runtime))) <= 1e-5
    assert model.conv1.weight.shape[0] == 64  # the caller's model is untouched


@pytest.mark.slow
@capture_methods
def test_across_mobilenet_v2_inverted_residuals(capture):
    model = torchvision_model("mobilenet_v2")
    inputs = (torch.randn(2, 3, 32, 32),)
    gm, runtime, rewrites = removed(capture, model, inputs, "features.3:add")  # the 24-channel stream
    assert set(rewrites) == {"features.2.conv.2:conv", "features.2.conv.3:batch_norm", "features.3.conv.2:conv",
                             "features.3.conv.3:batch_norm", "features.3.conv.0.0:conv", "features.4.conv.0.0:conv"}
    gm_hidden, _, hidden = removed(capture, model, inputs, "features.3.conv.0.2:hardtanh")  # through the depthwise
    assert "features.3.conv.1.0:conv" in hidden and hidden["features.3.conv.2:conv"] == "2 input channels removed"
    with torch.no_grad():
        stream = masked(torchvision_model("mobilenet_v2"), ["features.3.conv.0.0", "features.4.conv.0.0"], CHANNELS)
        assert relative_error(stream(*inputs), first(gm(*runtime))) <= 1e-5
        inner = masked(torchvision_model("mobilenet_v2"), ["features.3.conv.2"], CHANNELS)
        assert relative_error(inner(*inputs), first(gm_hidden(*runtime))) <= 1e-5


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 1), nn.Conv2d(10, 5, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.c(torch.cat([self.relu(self.a(x)), torch.relu(self.b(x))], 1))


@capture_methods
def test_across_a_concatenation(capture):
    torch.manual_seed(0)
    model = Concat().eval()
    inputs = (torch.randn(2, 3, 8, 8),)
    gm, runtime, rewrites = removed(capture, model, inputs, "root:relu", [1, 4])  # the second operand of cat
    assert set(rewrites) == {"b:conv", "c:conv"}
    reference = masked(Concat().eval(), ["c"], [4 + 1, 4 + 4])
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert relative_error(reference(*inputs), first(gm(*runtime))) <= 1e-5


class Skip(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.relu, self.out = nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.out(self.relu(self.conv(x)) + x)


@capture_methods
@pytest.mark.parametrize("model, target, message", [
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU()), "1:relu", "reaches the graph output"),
    (lambda: Skip(), "root:add", "reaches the graph input"),
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2)), "1:relu", "grouped conv"),
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 2)), "1:relu",
     "cannot be traced"),
])
def test_refused_with_the_reason(capture, model, target, message):
    torch.manual_seed(0)
    with pytest.raises(fxcompress.PlanError, match=message):
        removed(capture, model().eval(), (torch.randn(2, 3, 8, 8),), target, [1, 2])
