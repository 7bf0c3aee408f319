"""The committed models of the main job (bench/results/oneshot/mobilenet_v2_demo.pt): the one-shot plan applies to
the real architecture and compresses it to fewer weight layers with the planned model's outputs; the control is
the same architecture with nothing removed."""
from pathlib import Path

import pytest
import torch

import fxcompress
from fxcompress import Plan
from fxcompress.models import pretrained_mobilenet_v2, with_classes
from fxcompress.trainable import apply_plan

DEMO_FILE = Path(__file__).parents[1] / "bench" / "results" / "oneshot" / "mobilenet_v2_demo.pt"


def committed(saved: dict, label: str) -> tuple[torch.nn.Module, Plan]:
    model = with_classes(pretrained_mobilenet_v2(), 10)
    model.load_state_dict({key: value.float() for key, value in saved[label]["state_dict"].items()})
    return model.eval(), Plan.from_dict(saved[label]["plan"])


@pytest.mark.slow
def test_the_committed_demo_model_is_shallower_and_compresses_to_its_planned_outputs():
    saved = torch.load(DEMO_FILE, map_location="cpu", weights_only=False)
    example = (torch.randn(1, 3, 64, 64),)
    control, control_plan = committed(saved, "control")
    model, plan = committed(saved, "shallower")
    assert not control_plan.decisions and plan.targets("linearize") and plan.targets("remove_block")
    planned = apply_plan(model, plan, example)
    result = fxcompress.compress(planned, example)
    dense = fxcompress.compress(control, example).report.after
    assert result.report.after.weight_layers < dense.weight_layers
    with torch.no_grad():
        reference = planned(example[0])
        assert (result.module(example[0]) - reference).abs().max() <= 1e-4 * reference.abs().max()
