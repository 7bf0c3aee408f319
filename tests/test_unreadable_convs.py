"""A BatchNorm after a conv the passes used to be unable to read (dilated, padding="same"/"valid", pruned with
torch.nn.utils.prune, weight_norm and other parametrisations): compress() and the depthprune backend give
the eager model's outputs, fold the BatchNorm where they can and report why where they cannot."""
import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.parametrizations
import torch.nn.utils.prune
from torch import fx, nn

import fxcompress
from fxcompress.backends.precision import cast
from fxcompress.capture import capture, private_copy
from fxcompress.config import CompressConfig
from fxcompress.context import PassContext
from fxcompress.graph import annotate_names
from fxcompress.merge_math import ConvSpec, add_parallel_convs, compose_conv, fold_batchnorm, numeric_padding
from fxcompress.passes import fold_constants
from fxcompress.pipeline import apply_pass
from helpers import (assert_state_unchanged, dynamo_graph, randomize_batchnorm, relative_error, state_of,
                     torchvision_model)


def pruned(conv: nn.Conv2d) -> nn.Conv2d:
    torch.nn.utils.prune.l1_unstructured(conv, "weight", 0.5)
    return conv


def old_weight_norm(conv: nn.Conv2d) -> nn.Conv2d:
    with pytest.warns(FutureWarning):
        return torch.nn.utils.weight_norm(conv)


# the conv under test (8 -> 8 channels), and whether the BatchNorm after it can be folded
CASES = {
    "dilated": (lambda: nn.Conv2d(8, 8, 3, padding=2, dilation=2), True),
    "dilated_same": (lambda: nn.Conv2d(8, 8, 3, padding="same", dilation=(2, 3)), True),
    "same": (lambda: nn.Conv2d(8, 8, (3, 5), padding="same"), True),
    "valid": (lambda: nn.Conv2d(8, 8, 3, padding="valid"), True),
    "same_even_kernel": (lambda: nn.Conv2d(8, 8, 2, padding="same"), False),
    "pruned": (lambda: pruned(nn.Conv2d(8, 8, 3, padding=1)), True),
    "pruned_dilated": (lambda: pruned(nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False)), True),
    "weight_norm": (lambda: torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(8, 8, 3, padding=1)), True),
    "weight_norm_hook": (lambda: old_weight_norm(nn.Conv2d(8, 8, 3, padding=1)), True),
    "spectral_norm": (lambda: torch.nn.utils.parametrizations.spectral_norm(nn.Conv2d(8, 8, 3, padding=1)), True),
}
SHAPE = (2, 3, 32, 32)


def network(make_conv) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          make_conv(), nn.BatchNorm2d(8), nn.ReLU())
    return randomize_batchnorm(model).eval()


def folds(report) -> list[tuple[str, ...]]:
    return [rewrite.sources for rewrite in report.rewrites if rewrite.pass_name == "fold_batchnorm"]


def skip_reasons(report, node: str) -> list[str]:
    return [skip.reason for skip in report.skips if skip.pass_name == "fold_batchnorm" and skip.node == node]


def check_report(report, foldable: bool) -> None:
    assert ("0:conv", "1:batch_norm") in folds(report)
    if foldable:
        assert ("3:conv", "4:batch_norm") in folds(report)
    else:
        assert len(folds(report)) == 1
        assert any("pads asymmetrically" in reason for reason in skip_reasons(report, "4:batch_norm"))


def check_outputs(model: nn.Module, compiled) -> None:
    x = torch.randn(*SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_compress(case):
    make_conv, foldable = CASES[case]
    model = network(make_conv)
    result = fxcompress.compress(model, (torch.randn(*SHAPE),))
    check_report(result.report, foldable)
    check_outputs(model, result.module)


@pytest.mark.parametrize("case", CASES)
def test_depthprune_backend(case):
    make_conv, foldable = CASES[case]
    model = network(make_conv)
    reports = []
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="depthprune", options={"lowering": "eager", "on_report": reports.append})
    check_outputs(model, compiled)
    torch._dynamo.reset()
    assert len(reports) == 1
    check_report(reports[0], foldable)


def test_pruned_model_keeps_its_pruning():
    model = network(lambda: pruned(nn.Conv2d(8, 8, 3, padding=1)))
    conv, x = model[3], torch.randn(*SHAPE)
    before, weight = state_of(model), conv.weight
    fxcompress.compress(model, (x,))
    assert conv.weight is weight
    torch._dynamo.reset()
    torch.compile(model, backend="depthprune", options={"lowering": "eager"})(x)
    torch._dynamo.reset()
    assert_state_unchanged(before, model)
    assert any(isinstance(hook, torch.nn.utils.prune.L1Unstructured) for hook in conv._forward_pre_hooks.values())
    assert {"weight_orig"} <= dict(conv.named_parameters()).keys()
    assert {"weight_mask"} <= dict(conv.named_buffers()).keys()
    with torch.no_grad():
        model(x)
    assert torch.equal(conv.weight, conv.weight_orig * conv.weight_mask)


def test_pruned_model_is_copied_where_fxcompress_needs_a_copy():
    # Regression (found by the fuzzer): deepcopy refuses the pruned `weight` (not a graph leaf), so casting,
    # measuring and capturing a pruned model raised a raw RuntimeError
    model = network(lambda: pruned(nn.Conv2d(8, 8, 3, padding=1)))
    x = torch.randn(*SHAPE)
    half, (half_x,) = cast(model, (x,), "bf16")
    with torch.no_grad():
        assert relative_error(model(x), half(half_x).float()) <= 0.05
    fxcompress.measure({"pruned": model}, (x,), repeats=1, warmup=0)
    copy = private_copy(model)
    assert copy[3].weight_orig is not model[3].weight_orig
    with torch.no_grad():
        assert torch.equal(copy(x), model(x))


def test_plan_removes_channels_of_a_pruned_conv():
    model = network(lambda: pruned(nn.Conv2d(8, 8, 3, padding=1))).append(nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        model[4].bias[:3] = -100.0  # channels 0-2 of the pruned conv's ReLU are always off: removing them is exact
    plan = fxcompress.Plan((fxcompress.Decision("remove_channels", "5:relu", {"channels": [0, 1, 2]}),))
    result = fxcompress.compress(model, (torch.randn(*SHAPE),), plan=plan)
    assert ("3:conv", "4:batch_norm") in folds(result.report)
    check_outputs(model, result.module)


class DilatedResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.third = nn.Conv2d(8, 8, 3, padding=2, dilation=2)

    def forward(self, x):
        y = self.second(self.first(x))
        return self.third(y) + y


@pytest.mark.parametrize("capture_method", ["export", "dynamo"])
def test_merges_refuse_dilated_convs_with_a_reason(capture_method):
    torch.manual_seed(0)
    model, x = DilatedResidual().eval(), torch.randn(*SHAPE[:1], 8, *SHAPE[2:])
    if capture_method == "export":
        result = fxcompress.compress(model, (x,), force=True)
        compiled, report = result.module, result.report
    else:
        reports = []
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="depthprune",
                                 options={"lowering": "eager", "force": True, "on_report": reports.append})
        compiled(x)
        report = reports[0]
    reasons = {(skip.pass_name, skip.node): skip.reason for skip in report.skips}
    assert "dilated" in reasons["merge_conv_chain", "second:conv"]
    assert "dilation" in reasons["absorb_residual", "root:add"]
    assert not report.rewrites
    check_outputs_at(model, compiled, x.shape)


@pytest.mark.slow
def test_dilated_resnet50():
    model = torchvision_model("resnet50", replace_stride_with_dilation=[False, True, True])
    x = torch.randn(1, 3, 64, 64)
    result = fxcompress.compress(model, (x,))
    dilated = [name for name, conv in model.named_modules() if isinstance(conv, nn.Conv2d) and conv.dilation != (1, 1)]
    assert len(dilated) == 8  # the 3x3 convs of layer3 (but its first block) and of layer4
    folded = {sources[0] for sources in folds(result.report)}
    assert {f"{name}:conv" for name in dilated} <= folded
    assert not [skip for skip in result.report.skips if skip.pass_name == "fold_batchnorm"]
    check_outputs_at(model, result.module, x.shape)


def check_outputs_at(model, compiled, shape) -> None:
    x = torch.randn(*shape)
    with torch.no_grad():
        reference = model(x)
        torch.testing.assert_close(compiled(x), reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


# fold_constants on its own: what it folds and what it must leave computed, with the reason

class ComputedWeight(nn.Module):
    def __init__(self, weight_of):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8, 3, 3))
        self.scale = nn.Parameter(torch.rand(8, 1, 1, 1) + 0.5)
        self.weight_of = weight_of

    def forward(self, x):
        return F.conv2d(x, self.weight_of(self), padding=1)


def fold(capture_method: str, weight_of, deterministic: bool = True):
    torch.manual_seed(0)
    model = ComputedWeight(weight_of).eval()
    x = torch.randn(1, 8, 8, 8)
    if capture_method == "dynamo":
        gm, inputs = dynamo_graph(model, (x,))
    else:
        gm, inputs = (capture(model, (x,)) if capture_method == "export" else fx.symbolic_trace(model)), [x]
    annotate_names(gm)
    ctx = PassContext(CompressConfig(), "fold_constants")
    with torch.no_grad():
        reference = gm(*inputs)
        changed = bool(apply_pass(fold_constants, gm, ctx))
        gm.recompile()
        if deterministic:
            torch.testing.assert_close(gm(*inputs), reference, rtol=0, atol=0)
    ops = [node for node in gm.graph.nodes if node.op in ("call_function", "call_method")]
    return changed, ops, [skip.reason for skip in ctx.skips]


capture_methods = pytest.mark.parametrize("capture_method", ["export", "dynamo"])


@capture_methods
def test_fold_constants_folds_a_weight_computed_from_parameters(capture_method):
    changed, ops, skips = fold(capture_method, lambda m: m.weight * m.scale + 1)
    assert changed and len(ops) == 1 and not skips  # only the conv is left


@capture_methods
def test_fold_constants_leaves_an_expand(capture_method):
    changed, ops, skips = fold(capture_method, lambda m: m.scale.expand(8, 8, 3, 3) * 1)
    assert not changed and len(ops) == 3
    assert any("elements, over 8x its inputs" in reason for reason in skips)


@pytest.mark.parametrize("capture_method, weight_of, random_op", [
    ("export", lambda m: torch.rand_like(m.weight) * 0 + m.weight, "rand_like"),  # tagged random
    ("symbolic_trace", lambda m: F.dropout(m.weight, 0.5, training=True), "dropout"),  # draws when it runs
])
def test_fold_constants_leaves_random_weights(capture_method, weight_of, random_op):
    changed, ops, skips = fold(capture_method, weight_of, deterministic=False)
    assert not changed and "draws random numbers" in " ".join(skips)
    assert random_op in " ".join(str(node.target) for node in ops)


def test_fold_constants_leaves_a_constant_written_in_place():
    def weight_of(module):
        weight = module.weight.clone()
        weight.mul_(2)
        return weight

    changed, ops, skips = fold("symbolic_trace", weight_of)
    assert not changed and len(ops) == 3
    assert "clone" in str(ops[0].target) and "written in place" in " ".join(skips)


# the math, in float64

def dilated_spec(generator, dilation, padding) -> ConvSpec:
    weight = torch.randn(6, 4, 3, 3, generator=generator, dtype=torch.float64)
    return ConvSpec(weight, torch.randn(6, generator=generator, dtype=torch.float64), (1, 1), padding,
                    dilation=dilation)


def test_dilated_spec_and_batchnorm_fold_match_torch():
    generator = torch.Generator().manual_seed(0)
    spec = dilated_spec(generator, (2, 3), (2, 3))
    x = torch.randn(2, 4, 11, 13, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(spec(x), F.conv2d(x, spec.weight, spec.bias, 1, (2, 3), (2, 3)), rtol=0, atol=1e-12)
    mean, var = torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.5
    gamma, beta = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    folded = spec.with_weights(*fold_batchnorm(spec.weight, spec.bias, mean, var, gamma, beta, 1e-5))
    reference = F.batch_norm(F.conv2d(x, spec.weight, spec.bias, 1, (2, 3), (2, 3)), mean, var, gamma, beta, eps=1e-5)
    assert folded.dilation == (2, 3)
    torch.testing.assert_close(folded(x), reference, rtol=0, atol=1e-10)


def test_merges_refuse_dilated_specs():
    generator = torch.Generator().manual_seed(0)
    dilated, plain = dilated_spec(generator, (2, 2), (2, 2)), dilated_spec(generator, (1, 1), (1, 1))
    second = ConvSpec(torch.randn(6, 6, 3, 3, dtype=torch.float64), None, (1, 1), (1, 1))
    with pytest.raises(ValueError, match="dilation"):
        compose_conv(dilated, second, (8, 8))
    with pytest.raises(ValueError, match="dilation"):
        add_parallel_convs(dilated, plain, (8, 8))


@pytest.mark.parametrize("kernel, dilation", [((3, 3), (1, 1)), ((5, 3), (2, 3)), ((1, 7), (4, 1)), ((2, 3), (2, 1))])
def test_numeric_padding_equals_same(kernel, dilation):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 9, 10, generator=generator, dtype=torch.float64)
    weight = torch.randn(3, 2, *kernel, generator=generator, dtype=torch.float64)
    padding = numeric_padding("same", kernel, (1, 1), dilation)
    same = F.conv2d(x, weight, padding="same", dilation=dilation)
    torch.testing.assert_close(F.conv2d(x, weight, padding=padding, dilation=dilation), same, rtol=0, atol=1e-12)
    assert numeric_padding("valid", kernel, (2, 2), dilation) == (0, 0)


def test_numeric_padding_refuses_asymmetric_same():
    with pytest.raises(ValueError, match="asymmetric"):
        numeric_padding("same", (2, 3), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="stride"):
        numeric_padding("same", (3, 3), (2, 1), (1, 1))
