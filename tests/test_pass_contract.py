"""The pass contract of fxcompress/passes/README.md: a pass written from it alone works, the pipeline owns
verification and rollback, snapshots are taken only for passes that change the graph, plan passes report the
output change they make, and merged nodes carry names of their own."""
import operator
from functools import partial
from typing import Iterator

import pytest
import torch
from torch import fx, nn

import fxcompress
from fxcompress import graph, meta, verify
from fxcompress.context import PassContext, Site
from fxcompress.graph import replace_node, stable_name
from fxcompress.layers import emit_conv, read_conv
from fxcompress.merge_math import ConvSpec
from fxcompress.ops import aten, bind
from fxcompress.passes import EXACT_PASSES
from fxcompress.pipeline import compress_graph
from helpers import CAPTURES, linearized_reference, randomize_batchnorm, relative_error, torchvision_model

MULTIPLY = {operator.mul, torch.mul, aten.mul.Tensor}


def fold_scalar_mul(gm: fx.GraphModule, ctx: PassContext, wrong_bias: bool = False) -> Iterator[Site]:
    """conv(x) * c, c a number: one conv with weight and bias scaled by c. Written from passes/README.md."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in MULTIPLY or len(node.args) != 2:
            continue
        producer, factor = node.args
        call = bind(producer) if isinstance(producer, fx.Node) else None
        if call is None or call.kind != "conv" or not isinstance(factor, (int, float)):
            continue
        if len(producer.users) != 1:
            ctx.skip(stable_name(node), "the conv has other users")
            continue
        spec = read_conv(gm, call)
        if not spec:
            ctx.skip(stable_name(node), spec)
            continue
        bias = None if spec.bias is None else spec.bias * (factor + wrong_bias)
        scaled = spec.with_weights(spec.weight * factor, bias)
        yield Site(stable_name(node), partial(_replace, gm, node, producer, call["input"], scaled),
                   (stable_name(producer), stable_name(node)), detail=f"x {factor} folded")


def _replace(gm: fx.GraphModule, node: fx.Node, producer: fx.Node, source: fx.Node, spec: ConvSpec) -> None:
    replace_node(node, emit_conv(gm, source, spec, replacing=node))


class ScaledConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x) * 0.5)) * 3.0))


def compress_with(capture, rewrite_pass, model=None):
    torch.manual_seed(0)
    model = model or ScaledConvs().eval()
    x = (torch.randn(2, 3, 12, 12),)
    gm, inputs = CAPTURES[capture](model, x)
    with torch.no_grad():
        compressed, report = compress_graph(gm, inputs, exact_passes=(*EXACT_PASSES, rewrite_pass))
        output = compressed(*inputs)
        output = output[0] if isinstance(output, (tuple, list)) else output
        return relative_error(model(*x), output), compressed, report


@pytest.mark.parametrize("capture", CAPTURES)
def test_a_pass_written_from_the_readme_runs_in_the_pipeline(capture):
    error, compressed, report = compress_with(capture, fold_scalar_mul)
    assert error <= 1e-6
    assert [r.sources[-1] for r in report.rewrites if r.pass_name == "fold_scalar_mul"] == ["root:mul", "root:mul#1"]
    assert not [n for n in compressed.graph.nodes if n.target in MULTIPLY]


@pytest.mark.parametrize("capture", CAPTURES)
def test_the_pipeline_rolls_back_a_wrong_site_of_a_pass_that_knows_nothing_of_rollback(capture):
    wrong = partial(fold_scalar_mul, wrong_bias=True)
    wrong.__name__ = "fold_scalar_mul"
    error, compressed, report = compress_with(capture, wrong)
    assert error <= 1e-6
    assert [check.rolled_back for check in report.rollbacks] == ["root:mul", "root:mul#1"]
    assert len([n for n in compressed.graph.nodes if n.target in MULTIPLY]) == 2


def test_the_graph_is_copied_only_for_passes_that_change_it(monkeypatch):
    copies = []
    real = graph.Snapshot.of
    monkeypatch.setattr(graph.Snapshot, "of", lambda gm: copies.append(1) or real(gm))
    model = torchvision_model("resnet18")
    result = fxcompress.compress(model, (torch.randn(1, 3, 32, 32),))
    changed = {check.pass_name for check in result.report.checks}
    assert changed == {"fold_batchnorm"}
    assert len(copies) == len(result.report.checks) == 1  # before: one copy per pass per round, 12


def test_a_plan_pass_reports_the_output_change_it_makes():
    torch.manual_seed(0)
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                              nn.Conv2d(8, 4, 3))).eval()
    x = torch.randn(1, 3, 10, 10)
    samples = [verify.random_sample((x,))]  # what the pipeline replays
    result = fxcompress.compress(model, (x,), plan=fxcompress.Plan.linearize(["2:relu"]))
    reference = linearized_reference(model)
    with torch.no_grad():
        expected = verify.relative_error([[model(*s)] for s in samples], [[reference(*s)] for s in samples])
    check = next(check for check in result.report.checks if check.pass_name == "linearize")
    assert not check.verified and expected > 0.05
    assert check.relative_error == pytest.approx(expected, rel=1e-4)
    assert "relative output change made by the plan: linearize" in str(result.report)


@pytest.mark.parametrize("capture", CAPTURES)
def test_a_merged_node_has_a_stable_name_of_its_own(capture):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x) + x

    gm, inputs = CAPTURES[capture](Block().eval(), (torch.randn(1, 4, 8, 8),))
    with torch.no_grad():
        compressed, report = compress_graph(gm, inputs)
    assert [r.sources for r in report.rewrites] == [("conv:conv", "root:add")]
    names = [stable_name(n) for n in compressed.graph.nodes if n.op == "call_function"]
    assert names == ["root:conv"] and all(n.meta.get(meta.SHAPE) for n in compressed.graph.nodes
                                         if n.op == "call_function")
