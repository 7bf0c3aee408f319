"""The exact pipeline on real torchvision architectures: outputs unchanged, through both entry points."""
import pytest
import torch

import fxcompress
from helpers import assert_state_unchanged, relative_error, state_of, torchvision_model

pytestmark = pytest.mark.slow  # nine full torchvision models, through both entry points

MODELS = {
    "resnet18": {}, "resnet50": {}, "mobilenet_v2": {}, "vgg11_bn": {}, "efficientnet_b0": {},
    "convnext_tiny": {}, "regnet_y_400mf": {}, "vit_b_16": {"image_size": 64}, "swin_t": {},
}
# BatchNorm layers each architecture has (all foldable into the conv before them).
BATCHNORMS = {"resnet18": 20, "resnet50": 53, "mobilenet_v2": 52, "vgg11_bn": 8, "efficientnet_b0": 49,
              "convnext_tiny": 0, "regnet_y_400mf": 53, "vit_b_16": 0, "swin_t": 0}


@pytest.fixture(scope="module")
def example():
    return (torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)),)


@pytest.mark.parametrize("name", MODELS)
def test_compress_keeps_outputs(name, example):
    model = torchvision_model(name, **MODELS[name])
    before = state_of(model)
    with torch.no_grad():
        reference = model(*example)
        result = fxcompress.compress(model, example)
        output = result.module(*example)
    assert relative_error(reference, output) <= 1e-5
    folds = [r for r in result.report.rewrites if r.pass_name == "fold_batchnorm"]
    assert len(folds) == BATCHNORMS[name]
    assert result.report.after.macs <= result.report.before.macs
    assert_state_unchanged(before, model)


@pytest.mark.parametrize("name", MODELS)
def test_depthprune_backend_keeps_outputs(name, example):
    model = torchvision_model(name, **MODELS[name])
    before = state_of(model)
    reports = []
    compiled = torch.compile(model, backend="depthprune", options={"lowering": "eager", "on_report": reports.append})
    with torch.no_grad():
        reference = model(*example)
        output = compiled(*example)
    assert relative_error(reference, output) <= 1e-5
    folds = [r for report in reports for r in report.rewrites if r.pass_name == "fold_batchnorm"]
    assert len(folds) == BATCHNORMS[name]
    assert_state_unchanged(before, model)


def test_with_classes_replaces_the_head_of_a_copy_seeded():
    import torchvision
    from fxcompress.models import with_classes
    model = torchvision.models.mobilenet_v2()
    first, second = with_classes(model, 10), with_classes(model, 10)
    assert model.classifier[1].out_features == 1000 and first.classifier[1].out_features == 10
    assert torch.equal(first.classifier[1].weight, second.classifier[1].weight)
    assert torch.equal(first.features[0][0].weight, model.features[0][0].weight)
    assert with_classes(first, 10) is first
