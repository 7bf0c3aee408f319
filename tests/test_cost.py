"""The latency-driven cost model: merges are judged by measured latency on the target lowering."""
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress import pipeline
from fxcompress.cost import LatencyTable
from fxcompress.measure import op_timer
from fxcompress.merge_math import ConvSpec


class MacsAsLatency(LatencyTable):
    """A stand-in table whose 'measurement' is deterministic: MACs, scaled per (kernel, in channels)."""

    def __init__(self, penalty):
        super().__init__(timer=None, key="stand-in")
        self.penalty = penalty

    def _measure(self, spec, in_shape):
        out_pixels = in_shape[2] * in_shape[3] // (spec.stride[0] * spec.stride[1])
        macs = spec.weight.numel() * out_pixels
        return macs * self.penalty.get((spec.kernel_size[0], spec.weight.shape[1]), 1.0) * 1e-6


def compress_chain(model, x, **options):
    return fxcompress.compress(model.eval(), (x,), cost_model="latency", **options)


def test_stand_in_latency_refuses_a_merge_that_measures_slower(monkeypatch):
    chain = nn.Sequential(nn.Conv2d(16, 64, 1), nn.Conv2d(64, 16, 3, padding=1))
    x = torch.randn(1, 16, 8, 8)
    monkeypatch.setattr(pipeline, "LatencyTable", lambda timer, key: MacsAsLatency({}))
    merged = compress_chain(chain, x)
    assert merged.report.after.weight_layers == 1
    rewrite = [r for r in merged.report.rewrites if r.pass_name == "merge_conv_chain"][0]
    assert rewrite.latency_after_ms < rewrite.latency_before_ms and rewrite.macs_after < rewrite.macs_before
    # the same merge, on a backend where a 3x3 conv over 16 input channels runs 50x slower: refused
    monkeypatch.setattr(pipeline, "LatencyTable", lambda timer, key: MacsAsLatency({(3, 16): 50.0}))
    assert compress_chain(chain, x).report.after.weight_layers == 2


def test_a_wide_3x3_pair_stays_apart_even_where_its_merge_measures_faster(monkeypatch):
    # The 5x5 merge has more parameters (25C^2 against 18C^2): refused whatever the table says.
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1))
    for penalty in ({}, {(5, 16): 0.01}):
        monkeypatch.setattr(pipeline, "LatencyTable", lambda timer, key, penalty=penalty: MacsAsLatency(penalty))
        assert compress_chain(wide, torch.randn(1, 16, 8, 8), allow_approximate=True).report.after.weight_layers == 2


def test_stand_in_latency_merges_an_expand_project_pair(monkeypatch):
    # The same decision on timings measured on this CPU lives in bench/test_bench_latency.py.
    monkeypatch.setattr(pipeline, "LatencyTable", lambda timer, key: MacsAsLatency({}))
    expand_project = nn.Sequential(nn.Conv2d(16, 128, 1), nn.Conv2d(128, 16, 1))
    result = compress_chain(expand_project, torch.randn(1, 16, 8, 8))
    assert result.report.after.weight_layers == 1  # 1x1 16->16 instead of two 16x128 1x1s
    rewrite = result.report.rewrites[-1]
    assert rewrite.latency_after_ms == pytest.approx(rewrite.latency_before_ms / 16)  # 16*16 vs 2*16*128 MACs


def test_latency_table_is_cached_per_signature(tmp_path):
    table = LatencyTable(op_timer("eager", repeats=3), "eager|cpu", path=tmp_path / "lut.json")
    spec = ConvSpec(torch.randn(8, 4, 3, 3), None, (1, 1), (1, 1))
    first = table.latency(spec, (1, 4, 16, 16))
    assert table.latency(spec, (1, 4, 16, 16)) == first
    assert len(LatencyTable(op_timer("eager"), "eager|cpu", path=tmp_path / "lut.json").entries) == 1
    table.latency(spec, (2, 4, 16, 16))
    assert len(table.entries) == 2


def test_unknown_cost_model_is_named():
    with pytest.raises(fxcompress.OptionError, match="unknown cost_model 'flops'; valid: latency, macs"):
        fxcompress.CompressConfig(cost_model="flops")
