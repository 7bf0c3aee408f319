"""Public surface: plans, reports, errors, the caller's model, the command line."""
import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress import models
from helpers import all_activations, assert_state_unchanged, relative_error, state_of, torchvision_model


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU()).eval()


x = (torch.randn(2, 3, 8, 8),)


def test_plan_json_round_trip(tmp_path):
    plan = fxcompress.Plan.linearize(["2:relu", "5:relu"], model="net")
    assert fxcompress.Plan.from_json(plan.to_json()) == plan
    plan.save(tmp_path / "plan.json")
    assert fxcompress.Plan.load(tmp_path / "plan.json") == plan
    assert fxcompress.Plan.load(plan.to_dict()) == plan


@pytest.mark.parametrize("text, message", [
    ('{"format": 1, "decisions": [{"action": 5, "target": "x"}]}', "plan action must be a name, got 5"),
    ('{"format": 9, "decisions": []}', "not an fxcompress plan"),
    ("{not json", "not valid JSON"),
])
def test_bad_plans_are_refused(text, message):
    with pytest.raises(fxcompress.PlanError, match=message):
        fxcompress.Plan.load(text)


def test_plan_naming_absent_nodes_is_refused_with_candidates():
    plan = fxcompress.Plan.linearize(["features.0.2:hardtanh"], model="mobilenet_v2")
    message = r"linearize target\(s\) absent from this graph \(plan made for mobilenet_v2\).*2:relu"
    with pytest.raises(fxcompress.PlanError, match=message):
        fxcompress.compress(net(), x, plan=plan)


def test_plan_applied_equals_plan_returned():
    result = fxcompress.compress(net(), x, plan=all_activations(net(), x))
    assert result.plan.targets("linearize") == ["2:relu", "5:relu"]
    assert result.report.after.activations == 0 and result.report.after.weight_layers == 1


def test_report_prints_and_saves(tmp_path):
    result = fxcompress.compress(net(), x)
    text = str(result.report)
    assert "weight_layers" in text and "fold_batchnorm x2" in text
    result.report.save(tmp_path / "report.json")
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["before"]["weight_layers"] == 2 and data["after"]["weight_layers"] == 2
    assert [r["pass_name"] for r in data["rewrites"]] == ["fold_batchnorm", "fold_batchnorm"]
    assert data["approximations"] == 0


def test_training_mode_is_refused():
    with pytest.raises(fxcompress.CaptureError, match="training mode.*model.eval()"):
        fxcompress.compress(net().train(), x)


def test_wrong_option_names_the_valid_ones():
    with pytest.raises(fxcompress.OptionError, match="unknown option.*'forse'.*valid: allow_approximate"):
        fxcompress.compress(net(), x, forse=True)


def test_untraceable_model_gets_a_capture_error():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(fxcompress.CaptureError, match="torch.export could not capture DataDependent"):
        fxcompress.compress(DataDependent().eval(), x)


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, {"force": True, "allow_approximate": True}])
def test_callers_model_is_untouched(options):
    model = torchvision_model("resnet18")
    before = state_of(model)
    example = (torch.randn(1, 3, 32, 32),)
    result = fxcompress.compress(model, example, plan=all_activations(model, example), **options)
    with torch.no_grad():
        result.module(*example)
        for p in result.module.parameters():
            p.add_(1.0)  # editing the result must not reach the caller's model either
    assert_state_unchanged(before, model)


def test_compressed_module_is_not_sharing_storage_with_the_caller():
    model = net()
    result = fxcompress.compress(model, x)
    ours = {t.data_ptr() for t in model.state_dict().values()}
    assert not ours & {t.data_ptr() for t in result.module.state_dict().values()}


def test_pretrained_mobilenet_v2_loads_torchvisions_imagenet_weights():
    spec = importlib.util.find_spec(models.WEIGHTS_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / "weights" / models.WEIGHTS_FILE
    # torchvision names checkpoints after the first hex digits of their SHA-256
    assert hashlib.sha256(path.read_bytes()).hexdigest().startswith("b0353104")
    model = models.pretrained_mobilenet_v2()
    assert not model.training
    assert torch.equal(model.classifier[1].bias, torch.load(path, weights_only=True)["classifier.1.bias"])
