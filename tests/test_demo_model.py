"""The committed shallower MobileNetV2 of the main job (bench/results/prune/mobilenet_v2_demo.pt): its plan applies
to the real architecture and compresses it to fewer weight layers, with the outputs of the planned model."""
from pathlib import Path

import pytest
import torch

import fxcompress
from fxcompress import Plan
from fxcompress.trainable import apply_plan
from fxcompress.models import pretrained_mobilenet_v2, with_classes

DEMO_FILE = Path(__file__).parents[1] / "bench" / "results" / "prune" / "mobilenet_v2_demo.pt"


@pytest.mark.slow
def test_the_committed_demo_model_is_shallower_and_compresses_to_its_planned_outputs():
    saved = torch.load(DEMO_FILE, map_location="cpu", weights_only=False)
    model = with_classes(pretrained_mobilenet_v2(), 10)
    model.load_state_dict({key: value.float() for key, value in saved["kept"].items()})
    example = (torch.randn(1, 3, 64, 64),)
    plan = Plan.from_dict(saved["plan"])
    assert len(plan.targets("linearize")) >= 2
    planned = apply_plan(model.eval(), plan, example)
    result = fxcompress.compress(planned, example)
    dense = fxcompress.compress(model.eval(), example).report.after
    assert result.report.after.weight_layers < dense.weight_layers
    with torch.no_grad():
        reference = planned(example[0])
        assert (result.module(example[0]) - reference).abs().max() <= 1e-4 * reference.abs().max()
