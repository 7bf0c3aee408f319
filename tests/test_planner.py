"""The planner: budgets, the preference for decisions that unlock merges, and the plan round trip."""
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.planner import find_plan
from helpers import relative_error
from test_bn_criterion import confident_net


class Mixed(nn.Module):
    """relu_a sits between two linears (removing it unlocks a merge); relu_b feeds a max-pool (it does not).
    relu_b's input is almost always positive, so its entropy is the lower one."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(4, 3)
        self.relu_a, self.relu_b = nn.ReLU(), nn.ReLU()
        with torch.no_grad():
            self.fc2.bias.fill_(3.0)

    def forward(self, x):
        y = self.relu_b(self.fc2(self.relu_a(self.fc1(x))))
        return self.fc3(nn.functional.max_pool1d(y.unsqueeze(1), 2).squeeze(1))


torch.manual_seed(0)
rows = (torch.randn(16, 8),)
calibration = [torch.randn(16, 8) for _ in range(2)]


def mixed():
    torch.manual_seed(0)
    return Mixed().eval()


def test_decisions_that_unlock_merges_come_first_and_are_counted_apart():
    scores = find_plan(mixed(), rows, criterion="entropy", calibration=calibration, activations=2).scores
    assert scores["relu_b:relu"] < scores["relu_a:relu"]
    one = find_plan(mixed(), rows, criterion="entropy", calibration=calibration, activations=1)
    assert one.plan.targets("linearize") == ["relu_a:relu"]
    assert (one.unlocking, one.deleting_only) == (1, 0)
    assert one.refused == {"relu_b:relu": "over the budget of 1"}
    two = find_plan(mixed(), rows, criterion="entropy", calibration=calibration, activations=2)
    assert (two.unlocking, two.deleting_only) == (1, 1)


def test_macs_ratio_budget_stops_once_reached():
    result = find_plan(mixed(), rows, criterion="entropy", calibration=calibration, macs_ratio=0.9)
    assert [step["target"] for step in result.steps] == ["relu_a:relu"]
    assert result.steps[0]["macs_ratio"] <= 0.9  # fc1 and fc2 merge: 8*16 + 16*8 -> 8*8 MACs per row


def test_accuracy_budget_re_evaluates_after_each_step():
    model = mixed()
    with torch.no_grad():
        reference = model(*rows)
    evaluations = []

    def evaluator(module):
        with torch.no_grad():
            evaluations.append(-relative_error(reference, module(*rows)))
        return evaluations[-1]

    strict = find_plan(model, rows, criterion="entropy", calibration=calibration, max_drop=1e-6, evaluator=evaluator)
    assert len(evaluations) == 3  # the original, then one compression per candidate
    assert strict.plan.targets("linearize") == ["relu_b:relu"]  # its input is positive on these rows: no change
    assert strict.refused["relu_a:relu"].startswith("score drops")
    loose = find_plan(model, rows, criterion="entropy", calibration=calibration, max_drop=10.0, evaluator=evaluator)
    assert len(loose.plan.decisions) == 2 and [s["target"] for s in loose.steps] == ["relu_a:relu", "relu_b:relu"]


@pytest.mark.parametrize("options, message", [
    ({"criterion": "magic"}, "unknown criterion 'magic'; valid: bn, entropy, ot"),
    ({"criterion": "entropy"}, "criterion 'entropy' needs a budget"),
    ({"criterion": "bn", "activations": 1, "macs_ratio": 0.5}, "at most one budget"),
    ({"criterion": "bn", "max_drop": 0.1}, "needs evaluator"),
    ({"criterion": "bn", "aggregate": "median"}, "unknown aggregate 'median'; valid: max, mean"),
])
def test_wrong_planner_options_are_named(options, message):
    with pytest.raises(fxcompress.OptionError, match=message):
        find_plan(mixed(), rows, **options)


def test_plan_found_by_compress_gives_the_same_outputs_through_the_backend(tmp_path):
    model = confident_net()
    example = (torch.randn(2, 3, 8, 8),)
    result = fxcompress.compress(model, example, criterion="bn", max_error=1e-6)
    assert {d.action for d in result.plan.decisions} == {"remove_channels", "linearize"}
    result.plan.save(tmp_path / "plan.json")
    assert fxcompress.Plan.load(tmp_path / "plan.json") == result.plan
    compiled = torch.compile(model, backend="depthprune",
                             options={"lowering": "eager", "plan": str(tmp_path / "plan.json")})
    with torch.no_grad():
        assert relative_error(result.module(*example), compiled(*example)) <= 1e-5
