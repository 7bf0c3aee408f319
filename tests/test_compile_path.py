"""One compile path: `compress` finds a criterion's plan on the graph it compresses (after token reduction, with
one capture), the same function the `depthprune` backend runs."""
import pytest
import torch
import torchvision

import fxcompress
from fxcompress.tokens import TokenConfig, reduce_tokens
from helpers import relative_error, torchvision_model

TOKENS = TokenConfig(method="tome", ratio=0.5)


def small_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10)
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.2)
    return model.eval()


def test_a_criterion_plans_on_the_token_reduced_model_that_is_compressed():
    model, x = small_vit(), torch.randn(2, 3, 32, 32)
    seen = []

    def evaluator(module):
        with torch.no_grad():
            seen.append(module(x))
        return 0.0

    fxcompress.compress(model, (x,), tokens=TOKENS, criterion="entropy", calibration=[x],
                        planner={"max_drop": 1.0, "evaluator": evaluator})
    with torch.no_grad():
        reduced, original = reduce_tokens(model, TOKENS)(x), model(x)
    assert relative_error(original, reduced) > 1e-2  # the reduction changes the model
    assert relative_error(reduced, seen[0]) <= 1e-5  # the planner scores the reduced model


@pytest.mark.slow
def test_a_criterion_costs_no_second_capture(monkeypatch):
    exports = []
    real = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *args, **kwargs: exports.append(1) or real(*args, **kwargs))
    result = fxcompress.compress(torchvision_model("resnet18"), (torch.randn(1, 3, 32, 32),), criterion="bn",
                                 max_error=0.5, dynamic_batch=False)
    assert len(exports) == 1 and result.plan.decisions


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["compress", "torch.compile"])
def test_both_entries_find_the_same_bn_plan(entry):
    model, x = torchvision_model("resnet18"), torch.randn(1, 3, 32, 32)
    if entry == "compress":
        report = fxcompress.compress(model, (x,), criterion="bn", max_error=0.5).report
    else:
        reports = []
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="depthprune",
                                 options={"criterion": "bn", "max_error": 0.5, "on_report": reports.append})
        with torch.no_grad():
            compiled(x)
        torch._dynamo.reset()
        report = reports[0]
    expected = fxcompress.find_plan(model, (x,), criterion="bn", max_error=0.5).plan
    linearized = {r.sources[0] for r in report.rewrites if r.pass_name == "linearize"}
    assert linearized and linearized == {d.target for d in expected.decisions if d.action == "linearize"}


def test_a_criterion_replays_the_graph_once_for_names_and_shapes(monkeypatch):
    replays = []
    real = fxcompress.graph._ShapeRecorder.run
    monkeypatch.setattr(fxcompress.graph._ShapeRecorder, "run", lambda *args: replays.append(1) or real(*args))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()
    result = fxcompress.compress(model, (torch.randn(1, 3, 16, 16),), criterion="bn", dynamic_batch=False)
    assert not result.plan.decisions and not result.report.rewrites  # no pass changes the graph: no replay after one
    assert len(replays) == 1
