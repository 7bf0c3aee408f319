"""Equivalence fuzzing: random small conv (1-, 2-, 3-D) and token networks, each with one plan action.

The exact pipeline must not move outputs by more than 1e-5 (relative); a plan (linearise, remove or zero
always-off channels, remove a residual block, the BatchNorm criterion on confidently on/off channels)
must give the same outputs as a reference built without fxcompress (see tests/fuzz_nets.py). `bench/fuzz.py` runs more
examples. Every failure found becomes a regression test below.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import fuzz_nets
from fuzz_nets import ACTIONS, check, features, networks

EXAMPLES = int(os.environ.get("FXCOMPRESS_FUZZ_EXAMPLES", "200"))


@pytest.mark.slow
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(networks(backend_percent=2))
def test_random_networks_keep_their_outputs(spec):
    check(spec)


def unit(out, k=1, s=1, p=0, g=1, bias=False, bn=False, act=None, linear=False):
    return {"out": out, "k": k, "s": s, "p": p, "g": g, "bias": bias, "bn": bn, "act": act, "linear": linear}


def test_output_near_zero_on_the_example_is_no_reason_to_roll_back():
    # Found by the fuzzer: a single output of -0.0016 (a cancelling sum of features near 1) made a rounding
    # difference of 7e-8 look like 4.6e-5 relative; verification rolled back three exact rewrites. The scale
    # of an output is now its largest magnitude over all verification samples.
    spec = {"channels": 3, "size": 14, "batch": 1, "linearize": False,
            "blocks": [{"kind": "residual", "body": [unit(2, s=2, bn=True)], "shortcut": unit(2, s=2)},
                       {"kind": "residual", "body": [unit(2, s=2, bias=True, bn=True)],
                        "shortcut": unit(2, s=2, g=2, bn=True)}],
            "head": {"pool": False, "hidden": 1, "bias": False, "bn": True, "act": None, "linear": False,
                     "classes": 1}}
    check(spec)


def test_float32_rounding_of_an_exact_rewrite_is_told_from_a_wrong_one():
    # Found by the 5,000-example run: removing 15 of 16 off channels of a BatchNorm'd hidden layer moved the
    # float32 output by 2.0e-5 relative, while the same compression in float64 is within 1e-13 of the float64
    # reference: the BatchNorm fold's large terms cancel, an exact rewrite rounding differently
    spec = {"dims": 2, "channels": 6, "size": [10, 6], "batch": 1,
            "blocks": [{**unit(1, k=5, p=[1, 2], bias=True, act="hardtanh"), "kind": "unit", "pm": "replicate",
                        "d": [1, 2], "act_args": {"min_val": -2.0, "max_val": -1.5}}],
            "head": {"pool": True, "hidden": 16, "bias": False, "bn": True, "classes": 3, "act": "relu",
                     "linear": False},
            "target": "1", "off": [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], "action": "remove_channels"}
    with torch.no_grad():
        assert fuzz_nets.float64_error(spec, 0) <= fuzz_nets.FLOAT64_TOLERANCE
    assert check(spec) > 1e-5


@pytest.mark.slow
def test_the_generator_draws_every_feature():
    drawn = set()

    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(networks(backend_percent=5))
    def draw(spec):
        drawn.update(features(spec))

    draw()
    wanted = {"conv1d", "conv2d", "conv3d", "tokens", "dilation", "weight_norm", "prune", "transpose",
              "padding_mode_reflect", "padding_mode_replicate", "padding_mode_circular", "padding_str",
              "non_square", "stride3", "grouped", "act_hardtanh", "act_leaky_relu", "act_gelu", "backend",
              "bn_criterion_relu", "bn_criterion_hardtanh", "bn_criterion_leaky_relu"} | \
        {f"action_{action}" for action in ACTIONS}
    assert not wanted - drawn


def test_a_channel_that_is_not_off_cannot_be_zeroed_unnoticed(monkeypatch):
    # The check must be able to fail: without the BatchNorm statistics that make the channels off, zeroing
    # them changes the output, and the reference (the model itself) must tell.
    spec = {"channels": 3, "size": 8, "batch": 1, "action": "zero_channels", "target": "0.0", "off": [0, 1],
            "blocks": [{"kind": "unit", **unit(4, k=3, p=1, bn=True, act="relu")}],
            "head": {"pool": True, "hidden": 4, "bias": True, "bn": False, "act": None, "linear": False,
                     "classes": 2}}
    check(spec)
    monkeypatch.setattr(fuzz_nets, "_set_channel_states", lambda *args: None)
    with pytest.raises(AssertionError, match="outputs differ"):
        check(spec)
