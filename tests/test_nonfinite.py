"""Non-finite values never decide: evaluator scores, calibration statistics and float options that are nan or
inf are refused with a clear error naming the value."""
import math

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.config import CompressConfig
from fxcompress.errors import OptionError
from fxcompress.planner import find_plan
from fxcompress.tokens import TokenConfig

NAN, INF = float("nan"), float("inf")
x = (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)


def relu_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 1),
                         nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1)).eval()


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(x).relu() + x


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("where", ["original", "compressed"])
def test_an_evaluator_that_returns_a_non_finite_score_is_refused(where, bad):
    calls = []

    def evaluator(module):  # its first call scores the original model
        calls.append(module)
        return bad if (len(calls) == 1) == (where == "original") else 0.5

    with pytest.raises(OptionError, match=rf"the evaluator's score of the {where} model \(higher is better\) "
                                          rf"must be a finite number, got {bad}"):
        find_plan(relu_net(), x, criterion="entropy", calibration=[x[0]], max_drop=0.1, evaluator=evaluator)


def test_an_evaluator_returning_a_one_element_tensor_still_works():
    result = find_plan(relu_net(), x, criterion="entropy", calibration=[x[0]], max_drop=1.0,
                       evaluator=lambda module: torch.tensor(0.5))
    assert len(result.plan.targets("linearize")) == 2


@pytest.mark.parametrize("bad", [NAN, INF])
@pytest.mark.parametrize("criterion", ["entropy", "bn"])
def test_calibration_with_non_finite_values_is_refused_naming_the_activation(criterion, bad):
    batch = torch.full((2, 3, 8, 8), bad)
    with pytest.raises(OptionError, match=r"^calibration data gives non-finite statistics at the input of "
                                          r"activation '2:relu' \(nan or inf there\); calibration batches must "
                                          r"give finite values$"):
        find_plan(relu_net(), x, criterion=criterion, calibration=[x[0], batch], activations=2)


def test_calibration_with_non_finite_values_is_refused_by_the_block_distance():
    with pytest.raises(OptionError, match=r"^calibration data gives a non-finite block distance at 'root:add' "
                                          r"\(nan\); calibration batches must give finite values$"):
        find_plan(Residual().eval(), (x[0],), criterion="ot", calibration=[torch.full_like(x[0], NAN)],
                  activations=1)


def test_a_batchnorm_with_non_finite_parameters_is_refused_not_planned():
    model = relu_net()
    with torch.no_grad():
        model[1].bias[2] = NAN
    result = find_plan(model, x, criterion="bn", max_error=0.49)
    assert "2:relu" not in result.plan.targets("linearize")
    assert result.refused["2:relu"] == "channel error probability is not finite (non-finite BatchNorm weight or bias)"


@pytest.mark.parametrize("bad", [NAN, INF])
@pytest.mark.parametrize("option", ["max_error", "macs_ratio", "max_drop"])
def test_find_plan_refuses_non_finite_options(option, bad):
    options = {"max_error": 0.01, option: bad}
    if option == "max_drop":
        options["evaluator"] = lambda module: 1.0
    with pytest.raises(OptionError, match=rf"'{option}' must be "):
        find_plan(relu_net(), x, criterion="bn", **options)


@pytest.mark.parametrize("bad", [NAN, INF])
@pytest.mark.parametrize("options", [{"max_error": None}, {"planner": {"max_drop": None, "evaluator": len}},
                                     {"tolerance": None}])
def test_compress_refuses_non_finite_options(options, bad):
    options = {key: ({k: (bad if v is None else v) for k, v in value.items()} if isinstance(value, dict) else bad)
               for key, value in options.items()}
    with pytest.raises(OptionError, match=r"must be .*got (nan|inf)"):
        fxcompress.compress(relu_net(), x, criterion="bn", **options)


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("field, extra", [("alpha", {"ratio": 0.5}), ("ratio", {})])
def test_token_config_refuses_non_finite_numbers(field, extra, bad):
    with pytest.raises(OptionError, match=rf"token option '{field}' must be .*got {bad}"):
        TokenConfig(**{field: bad}, **extra)


@pytest.mark.parametrize("bad", [NAN, INF])
def test_compress_config_refuses_a_non_finite_tolerance(bad):
    with pytest.raises(OptionError, match=rf"option 'tolerance' must be .*got {bad}"):
        CompressConfig(tolerance=bad)


@pytest.mark.parametrize("options", [{"criterion": "bn", "max_error": NAN}, {"tolerance": NAN},
                                     {"tokens": {"ratio": 0.5, "alpha": NAN}}])
def test_backend_refuses_non_finite_options(options):
    compiled = torch.compile(relu_net(), backend="depthprune", options={"lowering": "eager", **options})
    with pytest.raises(Exception, match=r"must be .*got nan"):
        compiled(*x)


def test_finite_options_still_work():
    result = find_plan(relu_net(), x, criterion="entropy", calibration=[x[0]], max_drop=0.5,
                       evaluator=lambda module: 1.0)
    assert result.steps and all(math.isfinite(step["evaluation"]) for step in result.steps)
    assert TokenConfig(ratio=0.5, alpha=2).alpha == 2
