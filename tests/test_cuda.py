"""On an NVIDIA GPU: every entry point with a model and inputs on CUDA, against eager in float32 without TF32; the
GPU lowerings; the compressed module moved and cast. Skipped where CUDA is not available (conftest)."""
import copy

import pytest
import torch

import fxcompress
from fxcompress import Plan
from fxcompress.data import FASHION_MNIST_DIR, fashion_mnist_splits
from fxcompress.dynamo_backend import depthprune
from fxcompress.finetune.trainer import TrainConfig
from fxcompress.verify import full_precision
from helpers import relative_error, torchvision_model

pytestmark = pytest.mark.cuda
PLAN = Plan((*Plan.linearize(["features.2.conv.0.2:hardtanh", "features.2.conv.1.2:hardtanh"]).decisions,
             fxcompress.Decision("remove_channels", "features.3.conv.0.2:hardtanh", {"channels": [0, 3, 5]})))


@pytest.fixture
def model_and_input():
    model = torchvision_model("mobilenet_v2", num_classes=10).cuda()
    return model, torch.randn(4, 3, 64, 64, device="cuda")


@pytest.mark.parametrize("plan", [None, PLAN])
def test_compress_on_cuda_matches_eager(model_and_input, plan):
    model, x = model_and_input
    with full_precision(), torch.no_grad():
        reference = model(x) if plan is None else fxcompress.apply_plan(model, plan, (x,)).eval()(x)
        result = fxcompress.compress(model, (x,), plan=plan)
        assert relative_error(reference, result.module(x)) < 1e-4
    assert {t.device.type for t in result.module.state_dict().values()} == {"cuda"}
    assert result.report.after.weight_layers < result.report.before.weight_layers or plan is None


@pytest.mark.parametrize("lowering", ["eager", "inductor", "cudagraphs", "inductor-reduce-overhead"])
def test_the_backend_on_cuda_matches_eager(model_and_input, lowering):
    model, x = model_and_input
    reports = []
    compiled = torch.compile(model, backend=depthprune, options={"lowering": lowering, "plan": PLAN, "force": True,
                                                                  "on_report": reports.append})
    with full_precision(), torch.no_grad():
        expected = fxcompress.apply_plan(model, PLAN, (x,)).eval()(x)
        first, second = compiled(x).clone(), compiled(x).clone()
    tolerance = 1e-4 if lowering in ("eager", "cudagraphs") else 1e-3
    assert relative_error(expected, first) < tolerance and relative_error(expected, second) < tolerance
    assert reports and reports[0].after.weight_layers < reports[0].before.weight_layers


def test_the_backend_on_a_half_precision_model(model_and_input):
    model, x = model_and_input
    half = copy.deepcopy(model).half()
    compiled = torch.compile(half, backend=depthprune, options={"lowering": "eager"})
    with torch.no_grad():
        assert relative_error(half(x.half()).float(), compiled(x.half()).float()) < 1e-2


def test_the_compressed_module_moves_and_casts(model_and_input):
    model, x = model_and_input
    module = fxcompress.compress(model.cpu(), (x.cpu(),)).module
    with full_precision(), torch.no_grad():
        expected = module(x.cpu())
        moved = copy.deepcopy(module).to("cuda")
        assert relative_error(expected, moved(x).cpu()) < 1e-4
        assert relative_error(expected, moved.half()(x.half()).float().cpu()) < 2e-2


@pytest.mark.parametrize("lowering", ["eager", "cudagraphs", "inductor-reduce-overhead"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_measure_on_cuda(model_and_input, lowering, precision):
    model, x = model_and_input
    compressed = fxcompress.compress(model, (x,)).module
    timing = fxcompress.measure({"original": model, "compressed": compressed}, x, lowering=lowering, device="cuda",
                                precision=precision, repeats=5)
    assert timing["device"] == "cuda" and all(r["median_ms"] > 0 for r in timing["results"].values())
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_reduce_tokens_on_cuda():
    vit = torchvision_model("vit_b_16").cuda()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    config = {"method": "folder", "layers": [1], "ratio": 0.66}
    with full_precision(), torch.no_grad():
        reduced = fxcompress.reduce_tokens(vit, config)
        compressed = fxcompress.compress(vit, (x,), tokens=config).module
        assert relative_error(reduced(x), compressed(x)) < 1e-4


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST is not installed")
@pytest.mark.parametrize("method, options", [("easier", {"selection": "latency"}), ("magnitude", {}),
                                             ("oneshot", {"latency_ratio": 0.8,
                                                          "method_options": {"importance": "criterion"}})])
def test_prune_on_cuda(tmp_path, method, options):
    model = torchvision_model("mobilenet_v2", num_classes=10)
    data = fashion_mnist_splits(32, validation=128, train_samples=128, test_samples=128)
    result = fxcompress.prune(model, (torch.randn(1, 3, 32, 32),), data=data, device="cuda", method=method,
                              **options, steps=2, max_drop=1.0, measure_latency=True, lowering="cudagraphs",
                              train_config=TrainConfig(max_batches=2, batch_size=32, progress=False), out=tmp_path,
                              progress=False)
    assert [step["step"] for step in result.trajectory.steps] == ([0, 1] if method == "oneshot" else [0, 1, 2])
    assert all(step["latency_ratio"] > 0 for step in result.trajectory.steps)
    state = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert {t.device.type for t in state["state_dict"].values()} == {"cpu"}
