"""Plan validation: every decision's action, target and params are checked against the graph before any pass
runs, with a PlanError naming the decision; valid plans apply as before; plan files that are binary or start
with a byte-order mark."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.capture import capture
from fxcompress.graph import annotate_names, annotate_shapes
from fxcompress import passes
from fxcompress.pipeline import check_plan
from fxcompress.plan import Decision, Plan
from fxcompress.tokens import TokenConfig
from fxcompress.tokens.graph import token_plan
from helpers import randomize_batchnorm, relative_error
from test_channel_removal import Concat
from test_tokens import IMAGES, torchvision_vit

x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
KEEP = [1, 2, 3, 4, 5, 6]  # channels 0 and 7 of 8 removed in the valid plans


def chain() -> nn.Module:
    """conv(3 -> 8) -> BN -> ReLU ("2:relu", 8 channels) -> conv(8 -> 4)."""
    torch.manual_seed(0)
    return randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                             nn.Conv2d(8, 4, 1))).eval()


class Block(nn.Module):
    """A residual block ("root:add")."""

    def __init__(self):
        super().__init__()
        self.conv, self.relu = nn.Conv2d(3, 3, 3, padding=1), nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(x)) + x


def plan_of(action: str, target: str, params: dict) -> Plan:
    return Plan((Decision(action, target, params),))


# --- channel indices --------------------------------------------------------------------------------------------

def test_index_past_the_target_width_does_not_remove_a_channel_of_the_other_branch():
    torch.manual_seed(0)
    model = Concat().eval()  # index 5 of "relu:relu" (4 channels) is channel 1 of "root:relu" inside the cat
    with pytest.raises(fxcompress.PlanError, match=r"remove_channels at relu:relu: channels \[5\] out of range; "
                                                   r"the target has 4 channels \(valid 0\.\.3\)"):
        fxcompress.compress(model, (x,), plan=plan_of("remove_channels", "relu:relu", {"channels": [5]}))


@pytest.mark.parametrize("action", ["remove_channels", "zero_channels"])
@pytest.mark.parametrize("params, message", [
    ({"channels": [8]}, r"channels \[8\] out of range; the target has 8 channels \(valid 0\.\.7\)"),
    ({"channels": [1, -1]}, r"channels \[-1\] out of range"),
    ({"channels": [2, 5, 2]}, r"channel 2 listed twice"),
    ({"channels": [True]}, r"'channels' must be a non-empty list of ints, got \[True\]"),
    ({"channels": [1.0]}, r"'channels' must be a non-empty list of ints, got \[1\.0\]"),
    ({"channels": []}, r"'channels' must be a non-empty list of ints, got \[\]"),
    ({"channels": "3"}, r"'channels' must be a non-empty list of ints, got '3'"),
    ({}, r"params need 'channels'"),
    ({"channels": [1], "chanels": [2]}, r"unknown param\(s\) 'chanels'; valid: channels"),
])
def test_bad_channel_params_are_refused_naming_the_decision(action, params, message):
    with pytest.raises(fxcompress.PlanError, match=rf"^{action} at 2:relu: {message}"):
        fxcompress.compress(chain(), (x,), plan=plan_of(action, "2:relu", params))


def test_valid_channel_plans_apply_as_before():
    """Channels 0 and 7 (the boundary) removed equals a network built without them; zeroed equals BN's gamma and
    beta set to 0 there (references in plain torch)."""
    model = chain()
    removed = fxcompress.compress(model, (x,), plan=plan_of("remove_channels", "2:relu", {"channels": [0, 7]}))
    small = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1)).eval()
    with torch.no_grad():
        for name, value in model.state_dict().items():
            kept = value if name == "3.bias" or name.endswith("num_batches_tracked") else \
                value[:, KEEP] if name == "3.weight" else value[KEEP]
            small.state_dict()[name].copy_(kept)
        assert relative_error(small(x), removed.module(x)) <= 1e-5
    zeroed = fxcompress.compress(model, (x,), plan=plan_of("zero_channels", "2:relu", {"channels": [0, 7]}))
    reference = chain()
    with torch.no_grad():
        reference[1].weight[[0, 7]] = 0
        reference[1].bias[[0, 7]] = 0
        assert relative_error(reference(x), zeroed.module(x)) <= 1e-5
        assert relative_error(model(x), zeroed.module(x)) > 1e-3  # the plan did change something


# --- params of the other actions, unknown actions, repeated decisions --------------------------------------------

@pytest.mark.parametrize("action, target", [("linearize", "2:relu"), ("remove_block", "root:add")])
def test_actions_without_params_refuse_params(action, target):
    model = chain() if action == "linearize" else Block().eval()
    with pytest.raises(fxcompress.PlanError, match=rf"^{action} at {target}: takes no params, got \{{'channels'"):
        fxcompress.compress(model, (x,), plan=plan_of(action, target, {"channels": [1]}))


def test_unknown_action_is_refused_listing_the_valid_ones():
    with pytest.raises(fxcompress.PlanError, match="unknown plan action 'explode'; valid: remove_block, "
                                                   "zero_channels, remove_channels, linearize, merge_tokens"):
        fxcompress.compress(chain(), (x,), plan=Plan.load(
            '{"format": 1, "decisions": [{"action": "explode", "target": "2:relu"}]}'))


def test_a_decision_repeated_is_refused():
    plan = Plan((Decision("zero_channels", "2:relu", {"channels": [1]}),
                 Decision("zero_channels", "2:relu", {"channels": [2]})))
    with pytest.raises(fxcompress.PlanError, match="zero_channels at 2:relu: the plan has 2 decisions for it"):
        fxcompress.compress(chain(), (x,), plan=plan)


@pytest.mark.parametrize("decision, message", [
    ({"action": "linearize", "target": "2:relu", "params": [1]}, r"params must be a dict with string keys, got \[1\]"),
    ({"action": "linearize", "target": "2:relu", "params": {1: 2}}, "params must be a dict with string keys"),
    ({"action": 5, "target": "2:relu"}, "plan action must be a name, got 5"),
    ({"action": "linearize", "target": ""}, "plan decision needs a target node name"),
])
def test_decisions_of_the_wrong_type_are_refused_when_loaded(decision, message):
    with pytest.raises(fxcompress.PlanError, match=message):
        Plan.load({"format": 1, "decisions": [decision]})


def test_plan_actions_run_in_one_registry_order():
    assert list(passes.PLAN_ACTIONS) == ["remove_block", "zero_channels", "remove_channels", "linearize",
                                         "merge_tokens"]
    assert all(action.apply.__name__ == name for name, action in passes.PLAN_ACTIONS.items())


# --- merge_tokens params ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vit_graph():
    gm = capture(torchvision_vit(), (IMAGES,))
    annotate_names(gm)
    annotate_shapes(gm, [IMAGES])
    return gm, token_plan(gm, TokenConfig(layers=[-1], ratio=0.5)).decisions[0]


@pytest.mark.parametrize("change, message", [
    ({"method": "bogus"}, r"'method' must be one of folder, tome, pool, drop, got 'bogus'"),
    ({"tokens": 66}, r"'tokens' must be an int in 2\.\.65 \(more than the 1 protected, at most the 65 tokens "
                     r"there\), got 66"),
    ({"tokens": 1}, r"'tokens' must be an int in 2\.\.65"),
    ({"tokens": True}, r"'tokens' must be an int in 2\.\.65 .*got True"),
    ({"protected": -1}, r"'protected' must be an int >= 0, got -1"),
    ({"protected": 1.0}, r"'protected' must be an int >= 0, got 1\.0"),
    ({"restore_order": "yes"}, r"'restore_order' must be a bool, got 'yes'"),
    ({"ratio": 0.5}, r"unknown param\(s\) 'ratio'; valid: method, tokens, protected, restore_order"),
])
def test_bad_merge_tokens_params_are_refused(vit_graph, change, message):
    gm, decision = vit_graph
    plan = plan_of("merge_tokens", decision.target, {**decision.params, **change})
    with pytest.raises(fxcompress.PlanError, match=rf"^merge_tokens at {decision.target}: {message}"):
        check_plan(gm, plan)


def test_merge_tokens_params_missing_are_refused(vit_graph):
    gm, decision = vit_graph
    params = {key: value for key, value in decision.params.items() if key != "tokens"}
    with pytest.raises(fxcompress.PlanError, match=r"params need 'tokens'"):
        check_plan(gm, plan_of("merge_tokens", decision.target, params))


def test_merge_tokens_on_a_non_token_target_is_refused():
    gm = capture(chain(), (x,))
    annotate_names(gm)
    annotate_shapes(gm, [x])
    with pytest.raises(fxcompress.PlanError, match=r"absent from this graph"):
        check_plan(gm, plan_of("merge_tokens", "2:relu", {"method": "folder", "tokens": 3, "protected": 1,
                                                          "restore_order": False}))


def test_valid_merge_tokens_plan_is_accepted(vit_graph):
    gm, decision = vit_graph
    check_plan(gm, Plan((decision,)))


# --- plan files -------------------------------------------------------------------------------------------------

def test_plan_file_with_a_byte_order_mark_loads(tmp_path):
    plan = plan_of("zero_channels", "2:relu", {"channels": [1, 2]})
    path = tmp_path / "plan.json"
    path.write_bytes(plan.to_json().encode("utf-8-sig"))
    assert Plan.load(path) == plan


def test_binary_plan_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "plan.bin"
    path.write_bytes(bytes(range(128, 256)) * 4)
    with pytest.raises(fxcompress.PlanError, match=r"plan file .*plan\.bin is not UTF-8 text"):
        Plan.load(path)
