"""The depthprune torch.compile backend: discovery, instance safety, options, lowering."""
import subprocess
import sys

import pytest
import torch
from torch import nn

import fxcompress
from helpers import all_activations, linearized_reference, relative_error, torchvision_model


def small_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 2)
    return net.eval()


x = torch.randn(2, 3, 8, 8)


@pytest.mark.slow
def test_backend_is_registered_through_the_entry_point_without_import():
    code = "import torch, sys; sys.exit(0 if 'depthprune' in torch._dynamo.list_backends() else 1)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_two_instances_of_one_class_each_get_their_own_weights():
    first, second = small_net(), small_net()
    with torch.no_grad():
        for p in second.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    opts = {"lowering": "eager"}
    compiled_first = torch.compile(first, backend="depthprune", options=opts)
    compiled_second = torch.compile(second, backend="depthprune", options=opts)
    with torch.no_grad():
        assert relative_error(first(x), compiled_first(x)) <= 1e-5
        assert relative_error(second(x), compiled_second(x)) <= 1e-5
        assert relative_error(first(x), compiled_first(x)) <= 1e-5


def test_in_place_weight_edit_after_compile_is_seen():
    net = small_net()
    reports = []
    compiled = torch.compile(net, backend="depthprune", options={"lowering": "eager", "on_report": reports.append})
    with torch.no_grad():
        compiled(x)
        net[1].running_var.mul_(3.0)  # a folded BatchNorm statistic
        net[0].weight.add_(0.5)
        assert relative_error(net(x), compiled(x)) <= 1e-5
    assert len(reports) == 2  # compiled again for the new weights


@pytest.mark.slow
def test_inductor_lowering_matches():
    net = small_net()
    compiled = torch.compile(net, backend="depthprune")
    with torch.no_grad():
        assert relative_error(net(x), compiled(x)) <= 1e-5


@pytest.mark.slow
def test_plan_from_compress_gives_same_outputs_through_the_backend():
    model = torchvision_model("mobilenet_v2")
    example = (torch.randn(1, 3, 32, 32),)
    plan = all_activations(model, example)
    result = fxcompress.compress(model, example, plan=plan, force=True)
    compiled = torch.compile(model, backend="depthprune",
                             options={"lowering": "eager", "plan": plan.to_json(), "force": True})
    with torch.no_grad():
        reference = linearized_reference(model)(*example)  # plain torch: every ReLU6 an identity
        assert relative_error(reference, result.module(*example)) <= 1e-5
        assert relative_error(reference, compiled(*example)) <= 1e-5


@pytest.mark.parametrize("options, message", [
    ({"lowering": "tvm"}, "unknown lowering 'tvm'; valid: cudagraphs, eager, inductor, inductor-reduce-overhead"),
    ({"forse": True}, "unknown depthprune option(s) 'forse'"),
    ({"force": "yes"}, "option 'force' must be bool"),
    ({"plan": "/nonexistent/plan.json"}, "plan file not found"),
])
def test_wrong_options_are_named(options, message):
    compiled = torch.compile(small_net(), backend="depthprune", options=options)
    with pytest.raises(Exception) as info:
        compiled(x)
    assert message in str(info.value)


@pytest.mark.slow
def test_dynamic_shapes_fold_and_refuse_resolution_bound_merges():
    model = torchvision_model("mobilenet_v2")
    plan = all_activations(model, (torch.randn(1, 3, 32, 32),))
    reports = []
    compiled = torch.compile(model, backend="depthprune", dynamic=True,
                             options={"lowering": "eager", "plan": plan, "force": True, "on_report": reports.append})
    reference = linearized_reference(model)
    with torch.no_grad():
        for shape in [(2, 3, 32, 32), (3, 3, 48, 48)]:
            x = torch.randn(*shape)
            assert relative_error(reference(x), compiled(x)) <= 1e-5
    assert len([r for r in reports[0].rewrites if r.pass_name == "fold_batchnorm"]) == 52
    assert any("allow_bias_map is off" in skip.reason for skip in reports[0].skips)
