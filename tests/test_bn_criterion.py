"""The data-free BatchNorm criterion (TLC): states, plans, exact linearisation + removal, backend options."""
import math

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress import meta
from fxcompress.config import CompressConfig
from fxcompress.context import PassContext
from fxcompress.criteria import gaussian_states
from fxcompress.graph import annotate_names, annotate_shapes, constant, stable_name
from fxcompress.ops import bind
from fxcompress.passes import ANALYSES
from fxcompress.passes import PLAN_ACTIONS
from fxcompress.pipeline import Pipeline
from fxcompress.planner import find_plan
from helpers import CAPTURES, relative_error

capture_methods = pytest.mark.parametrize("capture", CAPTURES)
OFF_1, OFF_2 = [1, 4, 6], [0, 3]


def confident_bn(channels: int, off: list[int]) -> nn.BatchNorm2d:
    """BatchNorm whose output is beta +- 1e-3: channels in `off` always negative, the others always positive."""
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.fill_(1e-3)
        bn.bias.copy_(torch.tensor([-1.0 if c in off else 1.0 for c in range(channels)]))
        bn.running_mean.normal_(0, 0.3)
        bn.running_var.uniform_(0.5, 2)
    return bn


def confident_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), confident_bn(8, OFF_1), nn.ReLU(),
                         nn.Conv2d(8, 6, 1), confident_bn(6, OFF_2), nn.ReLU(),
                         nn.Conv2d(6, 4, 3, padding=1)).eval()


x = (torch.randn(2, 3, 8, 8),)


def first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def test_gaussian_states_are_the_published_formulas():
    beta, gamma = torch.tensor([0.5, -1.0, 0.0, 2.0]), torch.tensor([1.0, 0.5, 2.0, -4.0])
    phi = lambda v: 0.5 * (1 + math.erf(v / math.sqrt(2)))  # noqa: E731
    states = gaussian_states(beta, gamma, 0.0)
    for c in range(4):
        assert states.p_off[c].item() == pytest.approx(phi(-beta[c].item() / abs(gamma[c].item())))
        assert states.error[c].item() == pytest.approx(phi(-abs(beta[c].item()) / abs(gamma[c].item())))
    relu6 = gaussian_states(torch.tensor([7.0, 3.0]), torch.tensor([0.1, 0.1]), 0.0, 6.0)
    assert relu6.states() == ["saturated", "on"]


@capture_methods
def test_bn_state_annotation_is_data_free_and_falls_back_to_calibration(capture):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), confident_bn(4, [2]), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.ReLU()).eval()
    gm, runtime = CAPTURES[capture](model, x)
    annotate_names(gm)
    annotate_shapes(gm, runtime)
    ctx = PassContext(CompressConfig(), "annotate_bn_state")
    ANALYSES["annotate_bn_state"](gm, ctx)
    states = {stable_name(n): n.meta.get(meta.CHANNEL_STATES) for n in gm.graph.nodes if bind(n) and
              bind(n).kind == "activation"}
    assert states["2:relu"].states() == ["on", "on", "off", "on"] and states["2:relu"].source == "batch_norm"
    assert states["4:relu"] is None
    assert [s.reason for s in ctx.skips] == ["input is not a BatchNorm and no calibration statistics were recorded"]
    result = find_plan(model, x, criterion="bn", calibration=[torch.randn(2, 3, 8, 8)], max_error=0.49)
    assert "4:relu" in result.scores
    assert result.refused.get("4:relu") != "no BatchNorm before it and no calibration statistics"
    assert find_plan(model, x, criterion="bn", max_error=0.49).refused["4:relu"] == \
        "no BatchNorm before it and no calibration statistics"


@capture_methods
def test_criterion_linearises_and_removes_exactly_and_shrinks_weights(capture):
    model = confident_net()
    result = find_plan(model, x, criterion="bn", max_error=1e-6)
    assert [(d.action, d.target, d.params) for d in result.plan.decisions] == [
        ("remove_channels", "2:relu", {"channels": OFF_1}), ("linearize", "2:relu", {}),
        ("remove_channels", "5:relu", {"channels": OFF_2}), ("linearize", "5:relu", {})]
    assert result.unlocking == 2 and result.deleting_only == 0
    gm, runtime = CAPTURES[capture](model, x)
    pipeline = Pipeline(gm, runtime, CompressConfig(), result.plan)
    for name in ("remove_channels", "linearize"):
        pipeline.run_pass(PLAN_ACTIONS[name].apply, verify=False)
    with torch.no_grad():
        assert relative_error(model(*x), first(pipeline.state.gm(*runtime))) <= 1e-5
    shapes = [tuple(constant(gm, bind(n)["weight"]).shape) for n in pipeline.state.gm.graph.nodes
              if bind(n) is not None and bind(n).kind == "conv"]
    assert shapes == [(5, 3, 3, 3), (4, 5, 1, 1), (4, 4, 3, 3)]
    assert not [n for n in pipeline.state.gm.graph.nodes if bind(n) is not None and bind(n).kind == "activation"]


def test_criterion_through_compress_merges_and_stays_exact():
    model = confident_net()
    result = fxcompress.compress(model, x, criterion="bn", max_error=1e-6)
    assert result.report.after.activations == 0 and result.report.after.weight_layers < 3
    with torch.no_grad():
        assert relative_error(model(*x), result.module(*x)) <= 1e-5


def test_uncertain_and_saturating_layers_are_refused_with_reasons():
    torch.manual_seed(0)
    uncertain = nn.BatchNorm2d(4)
    saturating = confident_bn(4, [])
    with torch.no_grad():
        uncertain.bias.copy_(torch.tensor([0.05, 1.0, -1.0, 1.0]))
        saturating.bias[0] = 9.0
    model = nn.Sequential(nn.Conv2d(3, 4, 1), uncertain, nn.ReLU(), nn.Conv2d(4, 4, 1), saturating,
                          nn.ReLU6()).eval()
    result = find_plan(model, x, criterion="bn", max_error=0.01)
    assert result.plan.decisions == ()
    assert result.refused["2:relu"].startswith("max channel error probability 0.48")
    assert result.refused["5:hardtanh"] == "some channels saturate (upper kink)"
    mean = find_plan(model, x, criterion="bn", max_error=0.3, aggregate="mean")  # errors .48, .16, .16, .16
    assert "2:relu" in mean.plan.targets("linearize")


def test_backend_applies_the_criterion_without_data():
    model = confident_net()
    reports = []
    compiled = torch.compile(model, backend="depthprune", options={
        "criterion": "bn", "max_error": 1e-6, "lowering": "eager", "on_report": reports.append})
    inputs = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert relative_error(model(inputs), compiled(inputs)) <= 1e-5
    assert reports[0].after.activations == 0
    assert {r.pass_name for r in reports[0].rewrites} >= {"remove_channels", "linearize"}


@pytest.mark.parametrize("options, message", [
    ({"criterion": "entropy"}, "criterion 'entropy' is not data-free; valid: bn"),
    ({"criterion": "bn", "max_error": 2}, "'max_error' must be a number in [0, 1)"),
    ({"max_error": 0.1}, "'max_error' needs criterion='bn'"),
    ({"criterion": "bn", "plan": fxcompress.Plan.linearize(["2:relu"])}, "either a plan or a criterion"),
])
def test_backend_criterion_options_are_checked(options, message):
    compiled = torch.compile(confident_net(), backend="depthprune", options=options)
    with pytest.raises(Exception) as info:
        compiled(*x)
    assert message in str(info.value)


@capture_methods
def test_off_channels_that_cannot_be_removed_are_zeroed_exactly(capture):
    torch.manual_seed(0)
    depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # its bias makes the off channels non-zero downstream
    model = nn.Sequential(nn.Conv2d(3, 8, 1), confident_bn(8, OFF_1), nn.ReLU(), depthwise, nn.BatchNorm2d(8),
                          nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    result = find_plan(model, x, criterion="bn", max_error=1e-6)
    assert [(d.action, d.params) for d in result.plan.decisions] == [("zero_channels", {"channels": OFF_1}),
                                                                     ("linearize", {})]
    gm, runtime = CAPTURES[capture](model, x)
    pipeline = Pipeline(gm, runtime, CompressConfig(), result.plan)
    for name in ("zero_channels", "linearize"):
        pipeline.run_pass(PLAN_ACTIONS[name].apply, verify=False)
    with torch.no_grad():
        assert relative_error(model(*x), first(pipeline.state.gm(*runtime))) <= 1e-5
