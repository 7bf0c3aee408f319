"""The prepared device check (bench/gpu_check.py), its CPU side: the variants it times build from the committed
plans, a smoke run writes the JSON the report reads, a spent budget records what it skipped."""
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", BENCH / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_latency_variants_build_from_the_committed_plans(gpu_check):
    (group,) = gpu_check.variants(smoke=True, device="cpu")
    plans = {name: options["plan"] for name, options in group["variants"].items()}
    assert set(plans) == {"exact", "iterative plan", "one-shot plan", "full collapse"}
    assert len(plans["full collapse"].targets("linearize")) == 32  # both activations of blocks 2-17
    assert plans["iterative plan"].targets("linearize") and plans["one-shot plan"].decisions


def test_a_spent_budget_records_what_it_skipped(gpu_check, tmp_path):
    record = gpu_check.run(tmp_path, "cpu", budget=0, smoke=True, stages=("latency",))
    assert record["latency"] == [{"model": "mobilenet_v2", "lowerings": ("eager",), "skipped": "budget"}]
    assert json.loads((tmp_path / "gpu_check.json").read_text())["machine"]["torch"]


@pytest.mark.slow
def test_a_smoke_run_writes_the_table_the_report_reads(gpu_check, tmp_path):
    record = gpu_check.run(tmp_path, "cpu", budget=600, smoke=True, stages=("latency",))
    (row,) = record["latency"]
    assert (row["model"], row["batch"], row["precision"], row["lowering"]) == ("mobilenet_v2", 1, "fp32", "eager")
    assert set(row["variants"]) == {"original", "exact", "iterative plan", "one-shot plan", "full collapse"}
    assert row["variants"]["exact"]["vs_exact"] == 1.0
    assert all(value["median_ms"] > 0 for value in row["variants"].values())
    summary = gpu_check.report(tmp_path, tmp_path / "results")
    assert "| mobilenet_v2 | 1 | fp32 | eager | full collapse |" in summary
    assert (tmp_path / "results" / "summary.md").read_text() == summary
