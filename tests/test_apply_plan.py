"""apply_plan: a trainable copy of a model with a plan applied at its call sites, equal to `compress` in eval
mode, live BatchNorm and gradients in train mode, plans stacked, the caller's model untouched."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

import fxcompress
from fxcompress import CaptureError, OptionError, Plan, PlanError
from fxcompress.trainable import apply_plan, base_of, plan_of
from fxcompress.plan import Decision

torch.manual_seed(0)
X = torch.randn(2, 3, 32, 32)


def relative(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def trained_batchnorm(model):
    """Give every BatchNorm non-trivial statistics, so that eval and train modes differ."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2, generator=generator)
            module.running_var.uniform_(0.5, 2, generator=generator)
            module.bias.data.normal_(0, 0.5, generator=generator)
    return model.eval()


def assert_equals_compress(model, plan, inputs=(X,)):
    planned = apply_plan(model, plan, inputs)
    reference = fxcompress.compress(model, inputs, plan=plan).module
    with torch.no_grad():
        assert relative(planned.eval()(*inputs), reference(*inputs)) < 1e-5
    return planned


class Functional(torch.nn.Module):
    """Functional, in-place and module activations; `skip` names the ones a hand-written reference drops."""

    def __init__(self, skip=()):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3), torch.nn.Conv2d(8, 8, 1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.act = torch.nn.ReLU(inplace=True)
        self.skip = set(skip)

    def forward(self, x):
        x = self.a(x)
        x = x if "relu" in self.skip else F.relu(x)
        x = self.bn(self.b(x))
        x = x if "act" in self.skip else self.act(x)
        y = self.c(x)
        if "relu_" not in self.skip:
            torch.relu_(y)
        return F.gelu(y) + x


def test_shared_relu_is_linearised_at_one_site_only():
    model = trained_batchnorm(torchvision.models.resnet18())
    assert_equals_compress(model, Plan.linearize(["layer1.0.relu:relu#1", "layer3.1.relu:relu", "relu:relu"]))


def test_mobilenet_v2_equals_compress():
    model = trained_batchnorm(torchvision.models.mobilenet_v2())
    names = fxcompress.activation_names(model, (X,))
    assert_equals_compress(model, Plan.linearize(names[::2]))


def test_functional_and_in_place_activations_against_a_hand_written_reference():
    model = trained_batchnorm(Functional())
    reference = Functional(skip=("act", "relu_"))
    reference.load_state_dict(model.state_dict())
    plan = Plan.linearize(["act:relu", "root:relu#1"])
    planned = assert_equals_compress(model, plan)
    with torch.no_grad():
        assert relative(planned(X), reference.eval()(X)) < 1e-6


def test_channel_and_block_actions_equal_compress():
    model = trained_batchnorm(torchvision.models.resnet18())
    plan = Plan((Decision("remove_block", "layer2.1:add"),
                 Decision("remove_channels", "layer1.0.relu:relu", {"channels": [1, 5]}),
                 Decision("zero_channels", "layer3.0.relu:relu", {"channels": [0, 2, 7]}),
                 Decision("linearize", "layer3.0.relu:relu")))
    assert_equals_compress(model, plan)


def test_train_mode_keeps_batchnorm_live_and_gradients_reach_every_parameter():
    model = trained_batchnorm(torchvision.models.mobilenet_v2())
    names = fxcompress.activation_names(model, (X,))
    planned = apply_plan(model, Plan.linearize(names[:10]), (X,))
    bn = planned.features[1].conv[0][1]
    before = bn.running_mean.clone()
    planned.train()
    output = planned(X)
    with torch.no_grad():
        eval_output = copy.deepcopy(planned).eval()(X)
    assert not torch.equal(bn.running_mean, before)
    assert (output - eval_output).abs().max() > 1e-3
    output.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in planned.parameters())
    optimiser = torch.optim.SGD(planned.parameters(), lr=0.1)
    optimiser.step()


@pytest.mark.slow
def test_compress_of_the_fine_tuned_model_merges_what_linearising_unlocked():
    model = trained_batchnorm(torchvision.models.mobilenet_v2())
    names = fxcompress.activation_names(model, (X,))
    planned = apply_plan(model, Plan.linearize(names[1:6]), (X,))
    planned.train()
    optimiser = torch.optim.SGD(planned.parameters(), lr=0.01)
    for _ in range(2):
        optimiser.zero_grad()
        planned(torch.randn(4, 3, 32, 32)).logsumexp(1).mean().backward()
        optimiser.step()
    planned.eval()
    dense = fxcompress.compress(model, (X,)).report.after
    result = fxcompress.compress(planned, (X,))
    assert result.plan.targets("linearize") == names[1:6]
    assert result.report.after.weight_layers < dense.weight_layers
    with torch.no_grad():
        assert relative(result.module(X), planned(X)) < 1e-5


def test_a_plan_applied_on_top_equals_both_plans_at_once():
    model = trained_batchnorm(torchvision.models.resnet18())
    first = Plan.linearize(["layer1.0.relu:relu"])
    second = Plan((Decision("zero_channels", "layer2.0.relu:relu", {"channels": [3]}),
                   Decision("linearize", "layer2.0.relu:relu")))
    stacked = apply_plan(apply_plan(model, first, (X,)), second, (X,))
    both = apply_plan(model, Plan(first.decisions + second.decisions), (X,))
    assert plan_of(stacked).decisions == first.decisions + second.decisions
    assert list(stacked.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        assert torch.equal(stacked(X), both(X))


def test_the_callers_model_is_untouched():
    model = trained_batchnorm(torchvision.models.resnet18())
    state = copy.deepcopy(model.state_dict())
    planned = apply_plan(model, Plan.linearize(["layer1.0.relu:relu"]), (X,))
    planned.train()
    planned(X).sum().backward()
    assert type(model) is torchvision.models.ResNet and not model.training
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in state.items())
    assert type(base_of(planned)) is torchvision.models.ResNet


def test_bad_plans_and_misuse_are_refused():
    model = trained_batchnorm(torchvision.models.resnet18())
    with pytest.raises(PlanError, match="absent from this graph"):
        apply_plan(model, Plan.linearize(["layer9.relu:relu"]), (X,))
    with pytest.raises(PlanError, match="channels"):
        apply_plan(model, Plan((Decision("zero_channels", "relu:relu", {"channels": [64]}),)), (X,))
    planned = apply_plan(model, Plan.linearize(["relu:relu"]), (X,))
    with pytest.raises(CaptureError, match="apply_plan"):
        fxcompress.capture(planned, (X,))
    with pytest.raises(OptionError, match="apply_plan"):
        fxcompress.compress(planned, (X,), criterion="bn")


@pytest.mark.slow
def test_zeroed_and_removed_channels_of_one_group_use_the_original_indices():
    """Regression: remove_channels ran before zero_channels, which then indexed the shrunk BatchNorm with the
    original indices (PassError: index 30 out of bounds; MobileNetV2's stem and first depthwise share a group)."""
    model = trained_batchnorm(torchvision.models.mobilenet_v2())
    plan = Plan((Decision("zero_channels", "features.0.2:hardtanh", {"channels": [0, 4, 30, 31]}),
                 Decision("linearize", "features.0.2:hardtanh"),
                 Decision("remove_channels", "features.1.conv.0.2:hardtanh", {"channels": [1, 5, 6]}),
                 Decision("linearize", "features.1.conv.0.2:hardtanh")))
    assert_equals_compress(model, plan)


@pytest.mark.slow
def test_torch_compile_of_a_planned_model_keeps_its_edits():
    """Dynamo traces the call-site edits: the depthprune backend compiles the planned model, not its base."""
    model = trained_batchnorm(torchvision.models.resnet18())
    planned = apply_plan(model, Plan.linearize(["layer1.0.relu:relu#1", "relu:relu"]), (X,)).eval()
    compiled = torch.compile(planned, backend="depthprune", options={"lowering": "eager"})
    with torch.no_grad():
        expected = planned(X)
        assert relative(compiled(X), expected) < 1e-5
        assert relative(model(X), expected) > 1e-2


def test_a_planned_and_pruned_model_saves_and_loads_with_its_plan(tmp_path):
    # Regression: torch.save raised a PicklingError (the planned class is made at run time).
    model = trained_batchnorm(torchvision.models.resnet18())
    plan = Plan((Decision("linearize", "layer1.0.relu:relu"), Decision("remove_block", "layer2.1:add")))
    planned = apply_plan(model, plan, (X,))
    torch.nn.utils.prune.l1_unstructured(planned.conv1, "weight", 0.5)
    planned.train()
    torch.save(planned, tmp_path / "planned.pt")
    loaded = torch.load(tmp_path / "planned.pt", weights_only=False)
    assert type(loaded).__name__ == "PlannedResNet" and plan_of(loaded) == plan_of(planned) and loaded.training
    assert hasattr(loaded.conv1, "weight_mask") and torch.equal(loaded.conv1.weight, planned.conv1.weight)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(X), planned.eval()(X))
    assert plan_of(copy.deepcopy(planned)) == plan_of(planned)  # a deep copy does not apply the plan again


def test_a_graph_captured_once_serves_scoring_and_applying_while_the_weights_are_unchanged(monkeypatch):
    from fxcompress import trainable
    model = trained_batchnorm(torchvision.models.mobilenet_v2(num_classes=10))
    planned = apply_plan(model, Plan.linearize(["features.2.conv.0.2:hardtanh"]), (X,))
    captured = trainable.base_graph(planned, (X,))
    captures = []
    monkeypatch.setattr(trainable, "capture", lambda *args: captures.append(1) or fxcompress.capture(*args))
    plan = Plan.linearize(["features.3.conv.0.2:hardtanh"])
    scored = trainable.planned_graph(planned, (X,), captured)
    applied = apply_plan(planned, plan, (X,), captured)
    assert captures == [] and plan_of(applied).targets("linearize") == ["features.2.conv.0.2:hardtanh",
                                                                       "features.3.conv.0.2:hardtanh"]
    with torch.no_grad():
        assert relative(scored(X), planned(X)) < 1e-5
        base_of(planned).features[0][0].weight.mul_(1.5)  # the graph no longer holds these weights
        rescored = trainable.planned_graph(planned, (X,), captured)
        assert captures == [1] and relative(rescored(X), planned(X)) < 1e-5
