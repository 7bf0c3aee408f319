"""LaCoOT's block distance: differentiable, zero for an identity block; block removal through a plan."""
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress import meta
from fxcompress.config import CompressConfig
from fxcompress.context import Calibration, PassContext
from fxcompress.graph import annotate_names, annotate_shapes, stable_name
from fxcompress.passes import ANALYSES
from fxcompress.planner import find_plan
from helpers import CAPTURES, relative_error

capture_methods = pytest.mark.parametrize("capture", CAPTURES)


class Block(nn.Module):
    def __init__(self, channels: int, dead: bool = False):
        super().__init__()
        self.conv1, self.relu, self.conv2 = nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), \
            nn.Conv2d(channels, channels, 3, padding=1)
        if dead:  # body(x) == 0: the block is the identity
            nn.init.zeros_(self.conv2.weight)
            nn.init.zeros_(self.conv2.bias)

    def forward(self, x):
        return self.conv2(self.relu(self.conv1(x))) + x


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 1), Block(4), Block(4, dead=True), Block(4), nn.Conv2d(4, 2, 1)).eval()


x = (torch.randn(4, 3, 8, 8),)


def test_gradients_flow_through_the_distance():
    block = Block(4)
    inputs = torch.randn(6, 4, 5, 5, requires_grad=True)
    distance = fxcompress.block_distance(inputs, block(inputs))
    distance.backward()
    assert distance.item() > 0
    assert inputs.grad.abs().sum() > 0 and block.conv1.weight.grad.abs().sum() > 0
    assert fxcompress.block_distance(inputs.detach(), inputs.detach()).item() == 0


@capture_methods
def test_annotation_scores_each_same_shape_block(capture):
    gm, runtime = CAPTURES[capture](net(), x)
    annotate_names(gm)
    annotate_shapes(gm, runtime)
    ctx = PassContext(CompressConfig(), "annotate_block_distance", calibration=Calibration([x[0], x[0] * 2]))
    ANALYSES["annotate_block_distance"](gm, ctx)
    distances = {stable_name(n): n.meta[meta.BLOCK_DISTANCE] for n in gm.graph.nodes if meta.BLOCK_DISTANCE in n.meta}
    assert list(distances) == ["1:add", "2:add", "3:add"]
    assert distances["2:add"] == 0 and distances["1:add"] > 0 and distances["3:add"] > 0


def test_removing_an_identity_block_changes_nothing():
    model = net()
    result = find_plan(model, x, criterion="ot", calibration=[x[0]], activations=1)
    assert result.plan.targets("remove_block") == ["2:add"]
    compressed = fxcompress.compress(model, x, plan=result.plan)
    assert compressed.report.after.weight_layers == compressed.report.before.weight_layers - 2
    with torch.no_grad():
        assert relative_error(model(*x), compressed.module(*x)) <= 1e-6


def test_removing_a_live_block_equals_its_shortcut():
    model = net()
    plan = fxcompress.Plan((fxcompress.Decision("remove_block", "1:add"),))
    compressed = fxcompress.compress(model, x, plan=plan)
    reference = nn.Sequential(model[0], model[2], model[3], model[4])
    with torch.no_grad():
        assert relative_error(reference(*x), compressed.module(*x)) <= 1e-5


def test_an_add_that_is_not_a_block_is_refused():
    class Parallel(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return self.a(x) + self.b(x)

    plan = fxcompress.Plan((fxcompress.Decision("remove_block", "root:add"),))
    with pytest.raises(fxcompress.PlanError, match="shortcut cannot be told from the body"):
        fxcompress.compress(Parallel().eval(), x, plan=plan)


class ProjectionBlock(nn.Module):
    """A shallow body beside a deeper projection shortcut: depth cannot tell which is which."""

    def __init__(self, shortcut_name: str):
        super().__init__()
        self.body = nn.Conv2d(3, 3, 1)
        setattr(self, shortcut_name, nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU()))
        self.shortcut_name = shortcut_name

    def forward(self, x):
        return self.body(x) + getattr(self, self.shortcut_name)(x)


def test_a_named_projection_shortcut_is_kept_even_when_deeper_than_the_body():
    # Regression (found by the fuzzer): the shallower operand was taken for the shortcut, so the body stayed
    torch.manual_seed(0)
    model = nn.Sequential(ProjectionBlock("downsample")).eval()
    plan = fxcompress.Plan((fxcompress.Decision("remove_block", "0:add"),))
    compressed = fxcompress.compress(model, x, plan=plan)
    with torch.no_grad():
        assert relative_error(model[0].downsample(*x), compressed.module(*x)) <= 1e-5


def test_an_unnamed_projection_shortcut_is_refused():
    model = nn.Sequential(ProjectionBlock("other")).eval()
    plan = fxcompress.Plan((fxcompress.Decision("remove_block", "0:add"),))
    with pytest.raises(fxcompress.PlanError, match="shortcut cannot be told from the body"):
        fxcompress.compress(model, x, plan=plan)
