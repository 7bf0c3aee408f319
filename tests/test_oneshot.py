"""One-shot selection: the knapsack against brute force, the candidate table and its latency table, the
`oneshot` method through the loop, distillation from the dense step, gradual linearisation."""
import copy
import json
import itertools
import random

import pytest
import torch
import torchvision

import fxcompress
from fxcompress.data import FASHION_MNIST_DIR, fashion_mnist_splits
from fxcompress.finetune.trainer import TrainConfig
from fxcompress.models import with_classes

from loop_models import small_cnn

needs_data = pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST is not installed")
FEW = TrainConfig(max_batches=2, batch_size=16, progress=False)


def tiny_data(size=16):
    return fashion_mnist_splits(size, validation=64, train_samples=96, test_samples=64)


@needs_data
def test_distillation_works_with_dense_epochs():
    """The dense step has no teacher yet: it trains plainly, and the steps after it distil the dense model."""
    config = TrainConfig(distill=0.7, max_batches=2, batch_size=16, progress=False)
    result = fxcompress.prune(small_cnn(), (torch.randn(1, 3, 16, 16),), method="easier", data=tiny_data(),
                              train_config=config, dense_epochs=1, steps=1, progress=False)
    assert [step["step"] for step in result.trajectory.steps] == [0, 1]


# --- the knapsack -----------------------------------------------------------------------------------------------

from fxcompress.errors import OptionError  # noqa: E402
from fxcompress.selection.knapsack import Item, component_options, reaching_saving, within_cost  # noqa: E402


def random_table(rng: random.Random, count: int):
    items = [Item(f"c{i}", rng.choice([rng.uniform(0, 1), float(rng.randint(0, 4))]), rng.randint(0, 5) / 2)
             for i in range(count)]
    conflicts = {frozenset(pair) for pair in itertools.combinations(range(count), 2) if rng.random() < 0.25}
    return items, conflicts


def compatible_subsets(count: int, conflicts):
    for size in range(count + 1):
        for subset in itertools.combinations(range(count), size):
            if not any(frozenset(pair) in conflicts for pair in itertools.combinations(subset, 2)):
                yield subset


@pytest.mark.parametrize("seed", range(40))
def test_the_knapsack_finds_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    items, conflicts = random_table(rng, rng.randint(1, 9))
    subsets = list(compatible_subsets(len(items), conflicts))
    total = lambda subset, field: sum(getattr(items[i], field) for i in subset)
    budget = rng.randint(0, 8) / 2
    best = max(total(s, "saving") for s in subsets if total(s, "cost") <= budget)
    chosen = within_cost(items, conflicts, budget)
    assert chosen.saving == pytest.approx(best) and chosen.cost <= budget + 1e-12
    needed = rng.uniform(0, 1.2) * max(total(s, "saving") for s in subsets)
    reaching = [total(s, "cost") for s in subsets if total(s, "saving") >= needed]
    found = reaching_saving(items, conflicts, needed)
    if not reaching:
        assert found is None
        return
    assert found.cost == pytest.approx(min(reaching)) and found.saving >= needed - 1e-12
    for selection in (chosen, found):
        indices = [int(name[1:]) for name in selection.names]
        assert not any(frozenset(pair) in conflicts for pair in itertools.combinations(indices, 2))


def test_the_knapsack_says_when_a_saving_is_out_of_reach_and_refuses_bad_tables():
    items = [Item("a", 1.0, 0.0), Item("b", 2.0, 1.0)]
    assert reaching_saving(items, {frozenset((0, 1))}, 2.5) is None
    assert reaching_saving(items, set(), 2.5).names == ("a", "b")
    with pytest.raises(OptionError, match="cost must be >= 0"):
        within_cost([Item("a", 1.0, -1.0)], set(), 1.0)
    with pytest.raises(OptionError, match="exclude each other in one chain"):
        component_options(list(range(17)), set())


# --- candidates and the latency table ---------------------------------------------------------------------------

from torchvision.models.mobilenetv2 import InvertedResidual  # noqa: E402

from fxcompress.capture import capture  # noqa: E402
from fxcompress.graph import annotate_names, annotate_shapes  # noqa: E402
from fxcompress.selection.candidates import conflicts, find_candidates, neighbours  # noqa: E402
from fxcompress.selection.latency import LatencyTable, changed_region  # noqa: E402
from fxcompress.selection.table import candidate_table  # noqa: E402

from helpers import randomize_batchnorm  # noqa: E402

X32 = (torch.randn(1, 3, 32, 32),)


def inverted_residuals() -> torch.nn.Module:
    """torchvision's own inverted residuals: a stem, two identical blocks with identity shortcuts, a strided one
    and one more with a shortcut; BatchNorm statistics randomised."""
    torch.manual_seed(0)
    stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 2, 1, bias=False), torch.nn.BatchNorm2d(16),
                               torch.nn.ReLU6(inplace=True))
    blocks = [InvertedResidual(16, 16, 1, 4), InvertedResidual(16, 16, 1, 4), InvertedResidual(16, 24, 2, 4),
              InvertedResidual(24, 24, 1, 4)]
    model = torch.nn.Sequential(stem, *blocks, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(24, 10))
    return randomize_batchnorm(model).eval()


def captured(model, example=X32):
    gm = capture(model, example)
    annotate_names(gm)
    annotate_shapes(gm, example)
    return gm


class CountingTimer:
    """Stands in for lowering and timing: a region 'takes' one ms per op, so savings follow the op count."""

    def __init__(self):
        self.calls = 0

    def __call__(self, before, before_inputs, after, after_inputs):
        self.calls += 1
        ops = lambda module: sum(node.op == "call_function" for node in module.graph.nodes)
        return float(ops(before)), float(ops(after))


def test_candidates_are_runs_blocks_and_their_conflicts():
    gm = captured(inverted_residuals())
    candidates = find_candidates(gm, ("linearize", "remove_block"))
    names = [candidate.name for candidate in candidates]
    pair = "linearize 1.conv.0.2:hardtanh+1.conv.1.2:hardtanh"
    assert pair in names and "remove_block 1" in names and "remove_block 2" in names and "remove_block 4" in names
    assert "remove_block 3" not in names  # strided: no identity shortcut
    pairs = conflicts(candidates, neighbours(gm))
    index = names.index
    assert frozenset((index(pair), index("linearize 1.conv.0.2:hardtanh"))) in pairs  # shares an activation
    assert frozenset((index("linearize 1.conv.0.2:hardtanh"), index("linearize 1.conv.1.2:hardtanh"))) in pairs
    assert frozenset((index(pair), index("remove_block 1"))) in pairs  # the block holds the pair's activations
    assert frozenset((index(pair), index("remove_block 2"))) not in pairs


def test_the_latency_table_times_each_signature_once(tmp_path):
    gm = captured(inverted_residuals())
    timer = CountingTimer()
    table = candidate_table(gm, X32, LatencyTable(timer, "stub", tmp_path / "table.json"),
                            kinds=("linearize", "remove_block"))
    entries = {entry.candidate.name: entry for entry in table.entries}
    assert all(entry.usable for entry in table.entries)
    # blocks 1 and 2 are the same shapes: one timing serves both, for every candidate of theirs
    assert entries["remove_block 1"].saving_ms == entries["remove_block 2"].saving_ms > 0
    assert entries["linearize 1.conv.0.2:hardtanh+1.conv.1.2:hardtanh"].saving_ms == \
        entries["linearize 2.conv.0.2:hardtanh+2.conv.1.2:hardtanh"].saving_ms > 0
    assert entries["linearize 1.conv.0.2:hardtanh+1.conv.1.2:hardtanh"].macs_saved > 0
    signatures = len(json.loads((tmp_path / "table.json").read_text()))
    assert timer.calls == signatures < sum(entry.saving_ms != 0 for entry in table.entries)
    again = CountingTimer()
    candidate_table(gm, X32, LatencyTable(again, "stub", tmp_path / "table.json"), kinds=("linearize", "remove_block"))
    assert again.calls == 0  # read from the file


def test_a_changed_region_is_what_the_candidate_replaces():
    from fxcompress.config import CompressConfig
    from fxcompress.pipeline import compress_graph
    gm = captured(inverted_residuals())
    exact, _ = compress_graph(copy.deepcopy(gm), X32, CompressConfig(), fxcompress.Plan())
    collapsed, _ = compress_graph(copy.deepcopy(gm), X32, CompressConfig(), fxcompress.Plan.linearize(
        ["1.conv.0.2:hardtanh", "1.conv.1.2:hardtanh"]))
    removed, added = changed_region(exact, collapsed)
    from fxcompress.ops import bind
    kinds = sorted(bind(node).kind for node in removed if bind(node) is not None)
    assert kinds == ["activation", "activation", "add", "conv", "conv", "conv"]  # BNs folded before
    assert [bind(node).kind for node in added] == ["conv"]  # one dense 3x3 with the shortcut as a Dirac tap
    assert {node.meta["fxcompress_name"].split(":")[0].split(".")[0] for node in removed + added} == {"1"}


# --- the oneshot method on the loop -----------------------------------------------------------------------------

from fxcompress.trainable import apply_plan  # noqa: E402
from fxcompress.finetune.methods import StepInputs  # noqa: E402
from fxcompress.finetune.oneshot import probe_costs  # noqa: E402
from fxcompress.trainable import blending  # noqa: E402
from fxcompress.selection import select  # noqa: E402
from fxcompress.selection.importance import criterion_costs  # noqa: E402


def stub_table():
    gm = captured(inverted_residuals())
    return gm, candidate_table(gm, X32, LatencyTable(CountingTimer(), "stub"), kinds=("linearize", "remove_block"))


def test_probes_resume_from_their_file(tmp_path):
    _, table = stub_table()
    model = apply_plan(inverted_residuals(), fxcompress.Plan(), X32)
    probed = []

    def probe(planned, batches, samples, seed):
        probed.append(len(fxcompress.plan_of(planned).decisions))
        return -float(len(probed))  # every probe scores lower than the one before

    inputs = StepInputs(X32, [], None, random.Random(0), probe=probe, folder=tmp_path)
    wanted = [entry.candidate.name for entry in table.entries if entry.saving_ms >= 2]
    costs = probe_costs(model, table, inputs, batches=1, samples=8, min_saving=2)
    assert sorted(costs) == sorted(wanted) and probed[0] == 0 and len(probed) == len(wanted) + 1
    assert all(cost > 0 for cost in costs.values())
    probed.clear()
    assert probe_costs(model, table, inputs, batches=1, samples=8, min_saving=2) == costs and not probed


def test_select_reaches_the_latency_target_with_the_least_cost():
    _, table = stub_table()
    costs = {entry.candidate.name: (0.0 if entry.candidate.name == "remove_block 4" else 1.0)
             for entry in table.entries}
    base = 100.0
    result = select(table, costs, base, latency_ratio=0.95)
    assert result.reached and result.saving_ms >= 5 and result.predicted_ratio <= 0.95
    assert "remove_block 4" in [entry.candidate.name for entry in result.chosen]
    unreachable = select(table, costs, base, latency_ratio=0.01)
    assert not unreachable.reached and unreachable.saving_ms == max(
        select(table, costs, base, budget=1e9).saving_ms, unreachable.saving_ms)
    with pytest.raises(OptionError, match="exactly one of"):
        select(table, costs, base)


def test_criterion_costs_are_entropies_and_relative_block_distances():
    pytest.importorskip("ot")
    gm, table = stub_table()
    calibration = [(torch.randn(8, 3, 32, 32),) for _ in range(2)]
    costs = criterion_costs(gm, table, calibration)
    pair = costs["linearize 1.conv.0.2:hardtanh+1.conv.1.2:hardtanh"]
    assert pair == pytest.approx(costs["linearize 1.conv.0.2:hardtanh"] + costs["linearize 1.conv.1.2:hardtanh"])
    assert all(0 <= cost <= 2 * 3 for cost in costs.values()) and 0 < costs["remove_block 1"] < 2


@needs_data
@pytest.mark.slow
def test_the_oneshot_method_selects_once_then_fine_tunes_and_compresses_exactly(tmp_path):
    data = tiny_data(32)
    result = fxcompress.prune(inverted_residuals(), X32, method="oneshot", data=data, train_config=FEW,
                              method_options={"importance": "probe", "probe_batches": 1, "probe_samples": 16,
                                              "kinds": "linearize,remove_block"},
                              latency_ratio=0.95, lowering="eager", max_drop=1.0, anneal=0.5, out=tmp_path,
                              progress=False)
    steps = result.trajectory.steps
    assert [step["step"] for step in steps] == [0, 1] and "whole plan in step 1" in result.trajectory.stopped
    selection = json.loads((tmp_path / "selection.json").read_text())
    assert fxcompress.Plan.from_dict(selection["selection"]["plan"]).decisions == result.plan.decisions != ()
    assert "unchanged" in json.loads((tmp_path / "probes.json").read_text())
    assert steps[1]["latency_ratio"] < 1.5  # measured whole (eager, noisy): present, not judged
    compressed = fxcompress.compress(result.model, X32).module
    with torch.no_grad():
        assert torch.allclose(compressed(*X32), result.model.eval()(*X32), rtol=1e-4, atol=1e-5)


def test_blending_goes_from_the_original_to_the_plan_and_ends_at_the_plan():
    model = inverted_residuals()
    plan = fxcompress.Plan(tuple(fxcompress.Plan.linearize(["1.conv.0.2:hardtanh", "1.conv.1.2:hardtanh"]).decisions)
                           + (fxcompress.Decision("remove_block", "2:add"),))
    planned = apply_plan(model, plan, X32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        original, edited = model(x), planned(x)
        with blending(planned, model) as set_weight:
            assert torch.allclose(planned(x), original, atol=1e-6)
            set_weight(1.0)
            assert torch.allclose(planned(x), edited, atol=1e-6)
            set_weight(0.5)
            halfway = planned(x)
            assert not torch.allclose(halfway, original, atol=1e-3) and not torch.allclose(halfway, edited, atol=1e-3)
        assert torch.equal(planned(x), edited)  # whole again on exit: exactly the plan
        again = apply_plan(planned, fxcompress.Plan(), X32)
        with blending(again, planned):  # nothing new since `planned`: nothing blended
            assert torch.equal(again(x), edited)


# --- methods own their options; the wording of ratios -----------------------------------------------------------

from fxcompress.cli import main as cli_main  # noqa: E402
from fxcompress.finetune.methods import METHODS, Method, MethodOption, register_method  # noqa: E402
from fxcompress.measure import speedup  # noqa: E402


class Toy(Method):
    """Linearises the first `count` activations it finds: a method added in one class."""

    name = "toy"
    options = (MethodOption("count", 1, "activations per step", int, flag="toy-count", bounds=(1, 4)),)

    def __init__(self, selection="criterion", count=1):
        super().__init__(selection)
        self.count = count

    def candidates(self, gm, model, inputs):
        from fxcompress.finetune.methods import Choice
        from fxcompress.graph import names_of_kind
        return [Choice(name, (fxcompress.Decision("linearize", name),), 0.0)
                for name in names_of_kind(gm, "activation")[:self.count]]


@pytest.fixture
def toy_method():
    register_method(Toy)
    yield Toy
    del METHODS["toy"]


@needs_data
def test_a_registered_method_is_available_to_prune_and_the_cli(toy_method, tmp_path, capsys, monkeypatch):
    result = fxcompress.prune(small_cnn(), (torch.randn(1, 3, 16, 16),), method=Toy(count=2), data=tiny_data(),
                              train_config=FEW, steps=1, max_drop=1.0, per_step=2, progress=False)
    assert len(result.plan.targets("linearize")) == 2
    assert result.trajectory.settings["method"] == "toy" and result.trajectory.settings["method_options"] == {"count": 2}
    monkeypatch.chdir(__import__("pathlib").Path(__file__).parent)
    code = cli_main(["prune", "loop_models:small_cnn", "--method", "toy", "--toy-count", "2", "--size", "16",
                     "--out", str(tmp_path / "run"), "--steps", "1", "--max-drop", "1", "--train-samples", "32",
                     "--validation-samples", "32", "--test-samples", "32", "--batch-size", "16", "--max-batches", "1",
                     "--lowering", "eager", "--per-step", "2"])
    assert code == 0 and "2 activations linearised" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["prune", "loop_models:small_cnn", "--method", "toy", "--toy-count", "9", "--out", str(tmp_path / "x")])
    assert cli_main(["prune", "loop_models:small_cnn", "--method", "easier", "--toy-count", "2",
                     "--out", str(tmp_path / "y")]) == 2
    assert "--toy-count is an option of method toy, not of easier" in capsys.readouterr().err


def test_unknown_method_options_are_refused_with_the_valid_ones():
    with pytest.raises(OptionError, match=r"method 'tlc' has no option 'weight'; valid: rank"):
        fxcompress.prune(small_cnn(), (torch.randn(1, 3, 16, 16),), method="tlc", method_options={"weight": 1.0},
                         data=object())
    with pytest.raises(OptionError, match=r"unknown prune option\(s\) 'lacoot_weight'"):
        fxcompress.prune(small_cnn(), (torch.randn(1, 3, 16, 16),), method="lacoot", lacoot_weight=1.0, data=object())


def test_ratios_are_worded_one_way():
    assert speedup(0.6579) == "1.52× faster" and speedup(1.031) == "1.03× slower"
    assert speedup(1.0) == speedup(0.999) == "as fast (1.00×)"
    with pytest.raises(OptionError):
        speedup(0.0)


def test_the_package_imports_without_its_optional_dependencies():
    """The base install (torch only) imports; optional pieces are imported where they are used."""
    import subprocess
    import sys
    blocked = ["tqdm", "onnx", "onnxruntime", "onnxscript", "ot", "timm", "transformers", "diffusers", "matplotlib",
               "torchvision", "scipy"]
    code = f"import sys\nfor name in {blocked!r}: sys.modules[name] = None\nimport fxcompress\nprint('imported')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "imported" in result.stdout, result.stderr[-2000:]
