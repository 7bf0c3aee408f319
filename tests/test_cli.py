"""The command line, end to end: demo, compress (artifacts), bench, and clean failures."""
import json
import subprocess
import sys
import textwrap

import onnx
import pytest
import torch
import torchvision

from fxcompress.cli import main
from helpers import relative_error

pytestmark = pytest.mark.slow  # full torchvision models and fresh interpreters


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fxcompress.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_demo_on_a_torchvision_model(tmp_path, capsys):
    assert main(["demo", "resnet18", "--size", "32", "--repeats", "3", "--report", str(tmp_path / "r.json")]) == 0
    assert "fold_batchnorm x20" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["latency"]["original_ms"] > 0 and report["latency"]["compressed_ms"] > 0


def test_compress_torchvision_model_writes_pt2_plan_and_report(tmp_path):
    torch.manual_seed(0)  # the command builds a randomly initialised model: seeded, the reference rebuilds it
    assert main(["compress", "mobilenet_v2", "--size", "32", "--linearize-fraction", "0.5", "--force",
                 "--lowering", "eager", "--out", str(tmp_path)]) == 0
    extra = {"fxcompress.json": ""}
    program = torch.export.load(tmp_path / "model.pt2", extra_files=extra)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert json.loads(json.loads(extra["fxcompress.json"])["fxcompress_plan"]) == plan
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(plan["decisions"]) == 35 // 2 + 1
    assert report["after"]["weight_layers"] < report["before"]["weight_layers"]
    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v2().eval()
    for decision in plan["decisions"]:  # each ReLU6 the plan linearises becomes an identity
        reference.set_submodule(decision["target"].rpartition(":")[0], torch.nn.Identity())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(reference(x), program.module()(x)) <= 1e-5


def test_the_default_artifact_is_a_dynamic_batch_onnx_with_names_opset_plan_and_version(tmp_path):
    import onnxruntime
    assert main(["compress", "resnet18", "--size", "32", "--linearize-fraction", "0.25", "--opset", "18",
                 "--input-names", "images", "--out", str(tmp_path)]) == 0
    model = onnx.load(str(tmp_path / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["images"] and [o.name for o in model.graph.output] == ["output"]
    assert {entry.domain: entry.version for entry in model.opset_import}[""] == 18
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    assert json.loads(metadata["fxcompress_plan"]) == json.loads((tmp_path / "plan.json").read_text())
    assert metadata["fxcompress_version"]
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    for batch in (1, 3):  # the batch axis is symbolic by default, as compress captures it
        assert session.run(None, {"images": torch.randn(batch, 3, 32, 32).numpy()})[0].shape == (batch, 1000)


def test_compress_factory_model_to_onnx(tmp_path):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        import torch
        def small():
            return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                       torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 16 * 16, 4))
    """))
    done = run_cli("compress", "my_models:small", "--size", "16", "--lowering", "onnxruntime", "--out", "out",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    onnx.checker.check_model(str(tmp_path / "out" / "model.onnx"))
    assert json.loads((tmp_path / "out" / "report.json").read_text())["after"]["weight_layers"] == 2


def test_bench_writes_rows(tmp_path):
    assert main(["bench", "resnet18", "--size", "32", "--lowering", "eager,onnxruntime", "--batch-sizes", "1,2",
                 "--repeats", "2", "--json", str(tmp_path / "b.json")]) == 0
    rows = json.loads((tmp_path / "b.json").read_text())
    assert [(r["lowering"], r["batch"]) for r in rows] == [("eager", 1), ("onnxruntime", 1), ("eager", 2),
                                                           ("onnxruntime", 2)]


@pytest.mark.parametrize("args, message", [
    (["compress", "resnet9000"], "unknown torchvision model 'resnet9000'"),
    (["compress", "nosuch_module:factory"], "cannot import 'nosuch_module'"),
    (["compress", "os:getcwd"], "returned str, not a torch.nn.Module"),
    (["compress", "json:dumps"], "json:dumps() raised TypeError"),
    (["compress", "missing.pt2"], "no saved ExportedProgram at missing.pt2"),
    (["compress", "resnet18", "--lowering", "tvm"], "invalid choice: 'tvm'"),
    (["bench", "resnet18", "--lowering", "eager,tvm"], "unknown lowering 'tvm'"),
    (["compress", "untraceable:model"], "torch.export could not capture Untraceable"),
])
def test_failures_are_clean(tmp_path, args, message):
    (tmp_path / "untraceable.py").write_text(textwrap.dedent("""
        import torch
        class Untraceable(torch.nn.Module):
            def forward(self, x):
                return x * 2 if x.sum() > 0 else x
        def model():
            return Untraceable()
    """))
    done = run_cli(*args, "--size", "16", cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
