"""The op table binds both capture dialects to the same named arguments and the same stable names."""
import pytest
import torch

from fxcompress.graph import annotate_names, constant
from fxcompress.ops import bind
from fxcompress.pipeline import activation_names
from helpers import CAPTURES, torchvision_model


@pytest.mark.parametrize("capture", CAPTURES)
def test_batch_norm_arguments_bind_by_name_in_both_dialects(capture):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4, eps=1e-3)).eval()
    with torch.no_grad():
        for tensor in (model[1].running_mean, model[1].running_var, model[1].weight, model[1].bias):
            tensor.copy_(torch.rand(4) + 0.5)  # all four distinct, so a swapped argument shows
    gm, _ = CAPTURES[capture](model, (torch.randn(1, 3, 4, 4),))
    bns = [call for node in gm.graph.nodes if (call := bind(node)) is not None and call.kind == "batch_norm"]
    assert len(bns) == 1
    bn = bns[0]
    assert torch.equal(constant(gm, bn["running_mean"]), model[1].running_mean)
    assert torch.equal(constant(gm, bn["running_var"]), model[1].running_var)
    assert torch.equal(constant(gm, bn["weight"]), model[1].weight)
    assert torch.equal(constant(gm, bn["bias"]), model[1].bias)
    assert bn["eps"] == pytest.approx(1e-3) and bn["training"] is False


@pytest.mark.parametrize("name, kwargs", [("resnet18", {}), *(pytest.param(*case, marks=pytest.mark.slow) for case in [
    ("mobilenet_v2", {}), ("efficientnet_b0", {}), ("vit_b_16", {"image_size": 32})])])
def test_stable_activation_names_agree_across_capture_methods(name, kwargs):
    model = torchvision_model(name, **kwargs)
    example = (torch.randn(1, 3, 32, 32),)
    names = {}
    for capture, fn in CAPTURES.items():
        gm, _ = fn(model, example)
        annotate_names(gm)
        names[capture] = activation_names(gm)
    assert names["export"] == names["dynamo"]
    assert len(names["export"]) == len(set(names["export"])) > 0
