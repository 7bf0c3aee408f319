"""Bad inputs and odd graphs: each gives a clear error naming what is wrong, or a documented fallback
with correct outputs. One test per row of the README's bad-input table, through `compress` and the
depthprune backend where both apply."""
import copy
import importlib
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.backends import lower_module
from helpers import assert_state_unchanged, randomize_batchnorm, relative_error, state_of, torchvision_model

x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def conv_bn(cin=4, cout=4, k=3):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout))


def small_net():
    torch.manual_seed(0)
    return randomize_batchnorm(nn.Sequential(conv_bn(), nn.ReLU(), conv_bn(k=1))).eval()


def via_compress(model, inputs, plan=None, **options):
    result = fxcompress.compress(model, inputs, plan=plan, **options)
    return result.module, [result.report]


def via_backend(model, inputs, plan=None, **options):
    reports = []
    options = {"lowering": "eager", "on_report": reports.append, "plan": plan, **options}
    compiled = torch.compile(model, backend="depthprune", options=options)
    with torch.no_grad():
        compiled(*inputs)
    return compiled, reports


ENTRIES = {"compress": via_compress, "backend": via_backend}
# each case through both entry points; through the backend (a dynamo compilation) in the full lane only
entries = pytest.mark.parametrize("entry", ["compress", pytest.param("backend", marks=pytest.mark.slow)])


def rewrites(reports, pass_name):
    return [rewrite for report in reports for rewrite in report.rewrites if rewrite.pass_name == pass_name]


def skip_reasons(reports, pass_name):
    return [skip.reason for report in reports for skip in report.skips if skip.pass_name == pass_name]


# --- data-dependent control flow ----------------------------------------------------------------------------

class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = conv_bn(), conv_bn(k=1)

    def forward(self, x):
        y = self.first(x)
        return self.second(y) if y.sum() > 0 else self.second(-y)


def test_data_dependent_control_flow_is_refused_by_compress():
    with pytest.raises(fxcompress.CaptureError, match="torch.export could not capture DataDependent"):
        fxcompress.compress(randomize_batchnorm(DataDependent()).eval(), (x,))


def test_data_dependent_control_flow_compiles_piecewise_in_the_backend():
    model = randomize_batchnorm(DataDependent()).eval()
    compiled, reports = via_backend(model, (x,))
    with torch.no_grad():
        for sign in (1, -1):  # both branches
            assert relative_error(model(sign * x), compiled(sign * x)) <= 1e-5
    assert len(reports) >= 2  # one graph per piece around the break
    assert len(rewrites(reports, "fold_batchnorm")) >= 2


class GraphBreak(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = conv_bn(), conv_bn(k=1)

    def forward(self, x):
        y = F.relu(self.first(x))
        torch._dynamo.graph_break()
        return self.second(y)


@pytest.mark.parametrize("lowering", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_graph_break_compiles_piecewise_and_stays_correct(lowering):
    model = randomize_batchnorm(GraphBreak()).eval()
    compiled, reports = via_backend(model, (x,), lowering=lowering)
    with torch.no_grad():
        assert relative_error(model(x), compiled(x)) <= 1e-5
    assert len(reports) == 2 and all(len(rewrites([report], "fold_batchnorm")) == 1 for report in reports)


# --- training mode ------------------------------------------------------------------------------------------

def test_training_mode_is_refused_by_compress():
    with pytest.raises(fxcompress.CaptureError, match="Sequential is in training mode.*model.eval()"):
        fxcompress.compress(small_net().train(), (x,))


def test_batch_norm_in_training_mode_stays_live_in_the_backend():
    # Regression: its running statistics were baked as constants (never updated), and verification runs
    # wrote into the caller's buffers.
    model = small_net().train()
    eager = copy.deepcopy(model)
    compiled, reports = via_backend(model, (x,))  # one call
    eager(x)
    assert not rewrites(reports, "fold_batchnorm")
    assert "batch_norm in training mode" in skip_reasons(reports, "fold_batchnorm")
    for ours, theirs in zip(model.state_dict().values(), eager.state_dict().values()):
        assert torch.equal(ours, theirs)  # statistics updated exactly once, as in eager
    assert relative_error(eager(x), compiled(x)) <= 1e-5


@pytest.mark.slow
def test_a_model_training_through_the_backend_runs_uncompressed_with_every_gradient():
    # Regression: weights were baked, so a backward pass gave gradients to the BatchNorm parameters only.
    model = small_net().train()
    reports = []
    compiled = torch.compile(model, backend="depthprune", options={"lowering": "eager", "on_report": reports.append})
    with pytest.warns(UserWarning, match="depthprune compiles models for inference, but this one is in training mode"):
        compiled(x).sum().backward()
    assert not reports and all(parameter.grad is not None for parameter in model.parameters())
    with torch.no_grad():  # the same model under no_grad is compressed (its BatchNorm statistics stay live)
        compiled(x)
    assert reports


@entries
def test_a_submodule_left_in_training_mode_is_not_folded(entry):
    model = small_net()
    model[0][1].train()
    before = state_of(model)
    _, reports = ENTRIES[entry](model, (x,))
    assert [r.sources[-1] for r in rewrites(reports, "fold_batchnorm")] == ["2.1:batch_norm"]
    assert "batch_norm in training mode" in skip_reasons(reports, "fold_batchnorm")
    if entry == "compress":
        assert_state_unchanged(before, model)


# --- unsupported and custom ops -----------------------------------------------------------------------------

@torch.library.custom_op("fxcompress_test::scale", mutates_args=())
def scale(x: torch.Tensor) -> torch.Tensor:
    return x * 1.5


@scale.register_fake
def _(x):
    return torch.empty_like(x)


class CustomOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.a, self.b = conv_bn(), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.b(self.a(torch.erf(scale(self.first(x)))))


@entries
def test_custom_and_unknown_ops_are_opaque_and_passes_work_around_them(entry):
    model = randomize_batchnorm(CustomOps()).eval()
    module, reports = ENTRIES[entry](model, (x,), force=True)
    with torch.no_grad():
        assert relative_error(model(x), module(x)) <= 1e-5
    assert len(rewrites(reports, "fold_batchnorm")) == 1  # before the custom op
    assert len(rewrites(reports, "merge_conv_chain")) == 1  # after erf
    assert reports[0].after.weight_layers == 2


# --- in-place ops -------------------------------------------------------------------------------------------

class InPlaceOnSharedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.act, self.out = conv_bn(), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.first(x)
        self.act(y)  # result unused: y itself is rewritten
        return self.out(y) + y


class DeadInPlaceWrite(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.act = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.ReLU()

    def forward(self, x):
        y = self.a(x)
        z = self.act(self.b(y))
        y.mul_(2)  # result unused, but y is read below
        return z + y


class InPlaceBeforeBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        y.add_(1.0)
        return self.bn(y)


@entries
def test_in_place_write_between_conv_and_batch_norm_blocks_the_fold(entry):
    model = randomize_batchnorm(InPlaceBeforeBatchNorm()).eval()
    module, reports = ENTRIES[entry](model, (x,))
    with torch.no_grad():
        assert relative_error(model(x), module(x)) <= 1e-5
    assert not rewrites(reports, "fold_batchnorm")


@entries
def test_in_place_activation_on_a_folded_output(entry):
    # Regression: dead-code elimination dropped `relu(y, inplace=True)`, so every rewrite was rolled back.
    model = randomize_batchnorm(InPlaceOnSharedOutput()).eval()
    module, reports = ENTRIES[entry](model, (x,))
    with torch.no_grad():
        assert relative_error(model(x), module(x)) <= 1e-5
    assert len(rewrites(reports, "fold_batchnorm")) == 1
    assert not any(report.rollbacks for report in reports)


@entries
def test_dead_in_place_write_survives_linearisation(entry):
    # Regression: linearising `act` removed the unused `y.mul_(2)` with the dead code; the result was wrong.
    model = DeadInPlaceWrite().eval()
    reference = copy.deepcopy(model)
    reference.act = nn.Identity()
    module, reports = ENTRIES[entry](model, (x,), plan=fxcompress.Plan.linearize(["act:relu"]))
    with torch.no_grad():
        assert relative_error(reference(x), module(x)) <= 1e-5
    assert len(rewrites(reports, "linearize")) == 1


# --- shared weights, a module called twice ------------------------------------------------------------------

class SharedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.bn(self.a(x)) + 2 * self.b(x)


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.out = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.out(self.bn(self.conv(self.conv(x))))


@entries
@pytest.mark.parametrize("model_class", [SharedWeight, CalledTwice])
def test_weights_used_twice_are_folded_into_a_new_constant(entry, model_class):
    model = randomize_batchnorm(model_class()).eval()
    before = state_of(model)
    module, reports = ENTRIES[entry](model, (x,), force=True)
    with torch.no_grad():
        assert relative_error(model(x), module(x)) <= 1e-5
    assert len(rewrites(reports, "fold_batchnorm")) == 1
    assert_state_unchanged(before, model)


# --- shapes: batch size, dynamic shapes, channels-last ------------------------------------------------------

def test_backend_recompiles_for_a_new_batch_size_and_dynamic_shapes_follow():
    model = small_net()
    for dynamic in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="depthprune", dynamic=dynamic, options={"lowering": "eager"})
        with torch.no_grad():
            for batch, size in [(2, 8), (5, 8), (3, 12)]:
                inputs = torch.randn(batch, 4, size, size)
                assert relative_error(model(inputs), compiled(inputs)) <= 1e-5


def test_compress_result_is_specialised_to_the_example_shape():
    # Documented: with dynamic_batch=False the module is fixed to the example's shapes; its guard names them.
    module = fxcompress.compress(small_net(), (x,), dynamic_batch=False).module
    with pytest.raises(ValueError, match=r"takes input 0 of shape \(2, 4, 8, 8\) \(N: any size\), got \(3, 4, 8, 8\)"):
        module(torch.randn(3, 4, 8, 8))


@entries
def test_channels_last_model_and_inputs(entry):
    model = small_net().to(memory_format=torch.channels_last)
    inputs = (x.to(memory_format=torch.channels_last),)
    module, reports = ENTRIES[entry](model, inputs)
    with torch.no_grad():
        output = module(*inputs)
        assert relative_error(small_net()(x), output) <= 1e-5
    assert output.is_contiguous(memory_format=torch.channels_last)
    assert len(rewrites(reports, "fold_batchnorm")) == 2


# --- half and bfloat16 --------------------------------------------------------------------------------------

@entries
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_models_fold_without_rollback(entry, dtype):
    # Regression: the fixed tolerance 1e-4 rolled back every fold of a float16 or bfloat16 model.
    model = small_net().to(dtype)
    inputs = (x.to(dtype),)
    module, reports = ENTRIES[entry](model, inputs)
    with torch.no_grad():
        assert relative_error(model(*inputs).float(), module(*inputs).float()) <= 8 * torch.finfo(dtype).eps
    assert len(rewrites(reports, "fold_batchnorm")) == 2
    assert not any(report.rollbacks for report in reports)


def test_low_precision_tolerance_still_catches_a_wrong_fold(monkeypatch):
    module = importlib.import_module("fxcompress.passes.fold_batchnorm")
    real = module.fold_batchnorm_into

    def twenty_percent_off(*args):
        folded = real(*args)
        return folded.with_weights(folded.weight * 1.2, folded.bias)

    monkeypatch.setattr(module, "fold_batchnorm_into", twenty_percent_off)
    result = fxcompress.compress(small_net().half(), (x.half(),))
    assert not rewrites([result.report], "fold_batchnorm")
    assert len(result.report.rollbacks) == 2


# --- tuple and dict inputs and outputs ----------------------------------------------------------------------

class Structured(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(), conv_bn(k=1)

    def forward(self, pair, extra):
        u, v = self.a(pair[0]), self.b(pair[1] * extra["scale"])
        return {"u": u, "both": (u + v, v)}


@entries
@pytest.mark.parametrize("lowering", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_tuple_and_dict_inputs_and_outputs(entry, lowering):
    if entry == "compress" and lowering == "inductor":
        pytest.skip("lowering is a backend option")
    model = randomize_batchnorm(Structured()).eval()
    inputs = ((x, 2 * x), {"scale": torch.tensor(3.0)})
    options = {"lowering": lowering} if entry == "backend" else {}
    module, reports = ENTRIES[entry](model, inputs, **options)
    with torch.no_grad():
        reference, output = model(*inputs), module(*inputs)
    assert output.keys() == reference.keys() and isinstance(output["both"], tuple)
    for ours, theirs in [(output["u"], reference["u"]), *zip(output["both"], reference["both"])]:
        assert relative_error(theirs, ours) <= 1e-5
    assert len(rewrites(reports, "fold_batchnorm")) == 2


# --- plans --------------------------------------------------------------------------------------------------

@entries
def test_plan_naming_absent_nodes(entry):
    plan = fxcompress.Plan.linearize(["1:relu", "nowhere:relu"])
    with pytest.raises(Exception, match=r"1 linearize target\(s\) absent from this graph: nowhere:relu") as info:
        ENTRIES[entry](small_net(), (x,), plan=plan)
    assert isinstance(info.value, fxcompress.PlanError) or "PlanError" in str(info.value)  # dynamo wraps it


@pytest.mark.slow
def test_plan_from_a_different_model_names_the_model_it_was_made_for():
    image = (torch.randn(1, 3, 32, 32),)
    resnet = torchvision_model("resnet18")
    plan = fxcompress.Plan.linearize(fxcompress.api.activation_names(resnet, image)[:3], model="resnet18")
    with pytest.raises(fxcompress.PlanError, match=r"absent from this graph \(plan made for resnet18\).*layer1.0"
                                                   r".*valid targets here look like: features"):
        fxcompress.compress(torchvision_model("mobilenet_v2"), image, plan=plan)


# --- options ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"forse": True}, r"unknown option\(s\) 'forse'; valid: allow_approximate"),
    ({"force": 1}, "option 'force' must be bool, got 1"),
    ({"max_kernel_size": 5.0}, "option 'max_kernel_size' must be int, got 5.0"),
    ({"tolerance": 2}, r"option 'tolerance' must be in \(0, 1\), got 2"),
])
def test_options_with_wrong_names_or_types_are_named(options, message):
    with pytest.raises(fxcompress.OptionError, match=message):
        fxcompress.compress(small_net(), (x,), **options)


def test_config_and_options_together_are_refused():
    with pytest.raises(fxcompress.OptionError, match="either config or keyword options"):
        fxcompress.compress(small_net(), (x,), config=fxcompress.CompressConfig(), force=True)


@pytest.mark.parametrize("model, inputs, message", [
    (lambda: (lambda t: t), (x,), "expected a torch.nn.Module.*got function"),
    (small_net, (), "example_inputs must be a tensor or a non-empty tuple"),
    (small_net, None, "example_inputs must be a tensor or a non-empty tuple"),
])
def test_wrong_model_or_inputs_are_named(model, inputs, message):
    with pytest.raises(fxcompress.CaptureError, match=message):
        fxcompress.compress(model(), inputs)


# --- missing optional dependencies --------------------------------------------------------------------------

@pytest.mark.parametrize("lowering, package", [("onnxruntime", "onnxruntime"), ("tensorrt", "torch-tensorrt")])
def test_missing_lowering_dependency_is_named(monkeypatch, lowering, package):
    monkeypatch.setitem(sys.modules, {"tensorrt": "torch_tensorrt"}.get(lowering, lowering), None)
    with pytest.raises(fxcompress.MissingDependencyError, match=f"the {lowering} lowering needs {package}"):
        lower_module(small_net(), (x,), lowering)


def test_missing_pot_is_named(monkeypatch):
    from fxcompress.criteria import block_distance

    monkeypatch.setitem(sys.modules, "ot", None)
    with pytest.raises(fxcompress.MissingDependencyError, match="needs POT: pip install"):
        block_distance(torch.randn(4, 8), torch.randn(4, 8))


# --- calibration data ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("criterion", ["entropy", "ot"])
@pytest.mark.parametrize("calibration, message", [
    (None, r"pass 'annotate_\w+' needs calibration data"),
    ([], r"calibration data is empty: annotate_\w+ needs at least one batch"),
    (x, "calibration must be an iterable of batches"),
])
def test_missing_or_empty_calibration_data_is_named(criterion, calibration, message):
    # Regression: an empty list gave an empty plan, silently.
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(conv_bn(), nn.ReLU(), conv_bn())

        def forward(self, x):
            return torch.relu(self.body(x) + x)

    with pytest.raises(fxcompress.OptionError, match=message):
        fxcompress.compress(randomize_batchnorm(Block()).eval(), (x,), criterion=criterion, calibration=calibration,
                            planner={"activations": 1})
