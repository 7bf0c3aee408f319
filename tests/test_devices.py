"""Devices, tested on a CPU-only machine: what a pass or the loop creates lives on the graph's device (checked on
`meta` tensors under `helpers.OneDevice`), mismatched devices are refused with both named, GPU lowerings refuse CPU
inputs, checkpoints load without the device they were written on. tests/test_cuda.py runs the same on a GPU."""
import pytest
import torch
import torchvision

import fxcompress
from fxcompress import Plan
from fxcompress.capture import capture
from fxcompress.config import CompressConfig
from fxcompress.context import PassContext
from fxcompress.graph import annotate_names, annotate_shapes
from fxcompress.passes import EXACT_PASSES, PLAN_ACTIONS
from fxcompress.pipeline import apply_pass
from fxcompress.plan import Decision
from fxcompress.verify import full_precision, sample_inputs
from helpers import OneDevice, torchvision_model

PLAN = Plan((Decision("remove_channels", "features.2.conv.0.2:hardtanh", {"channels": [0, 3, 5]}),
             Decision("zero_channels", "features.3.conv.0.2:hardtanh", {"channels": [1, 2]}),
             Decision("linearize", "features.4.conv.0.2:hardtanh", {})))
VALUE_READING = ("merge_conv_chain",)  # reads weight values (.item()), which meta tensors do not have


def meta_graph():
    model = torchvision_model("mobilenet_v2", num_classes=10)
    example = (torch.randn(2, 3, 32, 32),)
    gm = capture(model, example)
    annotate_names(gm)
    annotate_shapes(gm, example)
    return gm.to("meta")


def test_sample_inputs_stay_on_the_inputs_device():
    samples = sample_inputs((torch.empty(2, 3, device="meta"), torch.tensor(0.5)))
    assert [[t.device.type for t in sample] for sample in samples] == [["meta", "cpu"], ["meta", "cpu"]]


def test_passes_create_constants_on_the_graphs_device():
    gm = meta_graph()
    applied = {}
    passes = [PLAN_ACTIONS[name].apply for name in ("remove_channels", "zero_channels", "linearize")]
    passes += [rewrite for rewrite in EXACT_PASSES if rewrite.__name__ not in VALUE_READING]
    for rewrite in passes:
        with OneDevice():
            applied[rewrite.__name__] = len(apply_pass(rewrite, gm, PassContext(CompressConfig(), rewrite.__name__,
                                                                                plan=PLAN)))
    assert applied["remove_channels"] == 5 and applied["zero_channels"] == 1 and applied["fold_batchnorm"] > 40
    assert {t.device.type for t in gm.state_dict().values()} == {"meta"}


@pytest.mark.parametrize("call", [
    lambda model, x: fxcompress.compress(model, x),
    lambda model, x: fxcompress.activation_names(model, x),
    lambda model, x: fxcompress.apply_plan(model, Plan(), x),
])
def test_inputs_on_another_device_are_refused_naming_both(call):
    model = torchvision.models.resnet18().eval()
    with pytest.raises(fxcompress.CaptureError, match=r"ResNet is on cpu but its example inputs are on meta: move "
                                                      r"them to cpu"):
        call(model, (torch.randn(1, 3, 32, 32, device="meta"),))


@pytest.mark.parametrize("lowering", ["cudagraphs", "inductor-reduce-overhead"])
def test_gpu_lowerings_refuse_cpu_inputs(lowering):
    from fxcompress.backends import lower_module
    with pytest.raises(fxcompress.OptionError, match=rf"the {lowering} lowering runs on a GPU: it needs CUDA inputs, "
                                                     r"got inputs on cpu"):
        lower_module(torch.nn.Linear(2, 2).eval(), (torch.randn(1, 2),), lowering)
    with pytest.raises(fxcompress.OptionError, match=rf"lowering '{lowering}' runs on a GPU; measure it with "
                                                     r"device='cuda'"):
        fxcompress.measure({"a": torch.nn.Linear(2, 2).eval()}, torch.randn(1, 2), lowering=lowering)


def test_depthprune_accepts_the_gpu_lowerings():
    from fxcompress.dynamo_backend import parse_options
    assert parse_options({"lowering": "cudagraphs"}).lowering == "cudagraphs"
    assert parse_options({"lowering": "inductor-reduce-overhead"}).lowering == "inductor-reduce-overhead"


def test_full_precision_turns_tf32_off_and_back():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with full_precision():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_measure_in_half_precision_leaves_the_model_as_it_was():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    timing = fxcompress.measure({"a": model}, torch.randn(1, 3, 8, 8), precision="bf16", repeats=2)
    assert timing["precision"] == "bf16" and timing["results"]["a"]["median_ms"] > 0
    assert {p.dtype for p in model.parameters()} == {torch.float32}
