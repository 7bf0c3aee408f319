"""Error paths of the command line and the API: one clear line (exit code 2 on the command line, a typed
FxCompressError in the API) naming what was wrong and what is expected; output paths checked before any
work. Also `compress --precision` for the .pt2 and ONNX artifacts."""
import math
import os
import sys
import textwrap

import onnx
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress import cli
from helpers import randomize_batchnorm, relative_error

SMALL_NET = """
import torch
def net():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 4))
    with torch.no_grad():
        for tensor in (model[1].weight, model[1].bias, model[1].running_mean):
            tensor.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    return model.eval()
"""


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A fresh current folder, importable for `module:factory` references, sys.path restored afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return tmp_path


def write_module(folder, name, source):
    (folder / f"{name}.py").write_text(textwrap.dedent(source))
    sys.modules.pop(name, None)
    return name


def run(argv, capsys):
    """Run the command line in this process: (exit code, stderr)."""
    try:
        code = cli.main(argv)
    except SystemExit as done:  # argparse
        code = done.code
    return code, capsys.readouterr().err


def assert_clean_failure(argv, capsys, message):
    code, err = run(argv, capsys)
    assert code == 2, err
    assert message in err, err
    assert len(err.strip().splitlines()[-1]) > 0 and "Traceback" not in err


# --- item 6: --precision for eager and inductor artifacts --------------------------------------------------

def small_net():
    """The factory's model, built here in plain torch."""
    namespace = {}
    exec(SMALL_NET, namespace)
    return namespace["net"]()


@pytest.mark.parametrize("backend, precision", [("eager", "fp16"), ("eager", "bf16"), ("inductor", "fp16")])
def test_precision_casts_the_saved_program(folder, capsys, backend, precision):
    # Regression: --precision was read only for TensorRT; the .pt2 stayed float32 with exit code 0.
    name = write_module(folder, f"precision_{backend}_{precision}", SMALL_NET)
    code, err = run(["compress", f"{name}:net", "--size", "8", "--lowering", backend, "--precision", precision,
                     "--out", "out"], capsys)
    assert code == 0, err
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    program = torch.export.load(folder / "out" / "model.pt2")
    weights = {**program.state_dict, **program.constants}
    assert weights and {tensor.dtype for tensor in weights.values()} == {dtype}
    x = torch.randn(1, 3, 8, 8)
    output = program.module()(x.to(dtype))
    assert output.dtype == dtype
    with torch.no_grad():
        assert relative_error(small_net()(x), output.float()) <= 8 * torch.finfo(dtype).eps


@pytest.mark.slow
def test_precision_fp16_onnx_and_bf16_onnx_refused(folder, capsys):
    name = write_module(folder, "precision_onnx", SMALL_NET)
    code, err = run(["compress", f"{name}:net", "--size", "8", "--lowering", "onnxruntime", "--precision", "fp16",
                     "--out", "out"], capsys)
    assert code == 0, err
    graph = onnx.load(str(folder / "out" / "model.onnx")).graph
    kinds = {init.data_type for init in graph.initializer}
    assert onnx.TensorProto.FLOAT16 in kinds and onnx.TensorProto.FLOAT not in kinds
    assert_clean_failure(["compress", f"{name}:net", "--size", "8", "--lowering", "onnxruntime", "--precision",
                          "bf16", "--out", "out2"], capsys, "--precision bf16 is not supported with --lowering "
                                                           "onnxruntime")
    assert not (folder / "out2").exists()


# --- item 10: saved programs --------------------------------------------------------------------------------

def saved_program(folder, size=32):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    path = folder / f"small{size}.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, size, size),)), path)
    return path


@pytest.mark.parametrize("write, problem", [
    (lambda path: path.write_bytes(os.urandom(300)), "not a zip archive"),
    (lambda path: torch.save({"weight": torch.ones(2)}, path), "a zip archive without the archive_format record"),
])
def test_a_corrupt_saved_program_is_named(folder, capsys, write, problem):
    # Regression: a zipfile.BadZipFile or RuntimeError traceback (and torch's logged traceback before it).
    write(folder / "noise.pt2")
    assert_clean_failure(["compress", "noise.pt2", "--size", "8"], capsys,
                         f"cannot read noise.pt2 as a saved ExportedProgram (torch.export.save): {problem}")


def test_a_saved_program_used_with_another_shape_is_named(folder, capsys):
    # Regression: export's guard failed deep inside the passes, with a traceback.
    path = saved_program(folder, 32)
    message = "the ExportedProgram takes input 0 of shape (1, 3, 32, 32) float32, got (1, 3, 64, 64) float32"
    assert_clean_failure(["compress", path.name, "--size", "64"], capsys, message)
    with pytest.raises(fxcompress.CaptureError, match=r"takes 1 input\(s\), got 2"):
        fxcompress.compress(torch.export.load(path), (torch.randn(1, 3, 32, 32), torch.randn(1)))
    with pytest.raises(fxcompress.CaptureError, match=r"input 0 of shape \(1, 3, 32, 32\) float32, got "
                                                      r"\(1, 3, 32, 32\) float64"):
        fxcompress.compress(torch.export.load(path), torch.randn(1, 3, 32, 32, dtype=torch.float64))


def test_a_saved_program_with_the_right_shape_compresses_and_is_measured(folder, capsys):
    # Regression: `demo saved.pt2` crashed in measure: "Unable to call ExportedProgram directly".
    path = saved_program(folder, 8)
    code, err = run(["demo", path.name, "--size", "8", "--repeats", "2"], capsys)
    assert code == 0, err


# --- item 10: factories that fail for any reason ------------------------------------------------------------

@pytest.mark.parametrize("source, message", [
    ("def net(:\n", "cannot import 'factory_{i}' (model reference 'factory_{i}:net'): SyntaxError: "),
    ("raise RuntimeError('no GPU here')\n", "cannot import 'factory_{i}' (model reference 'factory_{i}:net'): "
                                            "RuntimeError: no GPU here"),
    ("import sys\nsys.exit(3)\n", "cannot import 'factory_{i}' (model reference 'factory_{i}:net'): "
                                  "SystemExit: 3"),
    ("import not_installed_anywhere\n", "cannot import 'factory_{i}' (model reference 'factory_{i}:net'): "
                                        "ModuleNotFoundError: No module named 'not_installed_anywhere'"),
    ("def net():\n    raise ValueError('bad size')\n", "factory_{i}:net() raised ValueError: bad size"),
    ("def net():\n    raise SystemExit(1)\n", "factory_{i}:net() raised SystemExit: 1"),
    ("def net():\n    return 'resnet18'\n", "factory_{i}:net returned str, not a torch.nn.Module"),
    ("net = 3\n", "'factory_{i}' has no callable 'net'"),
])
def test_a_factory_that_fails_for_any_reason_is_named(folder, capsys, source, message, request):
    i = request.node.callspec.indices["source"]
    name = write_module(folder, f"factory_{i}", source)
    assert_clean_failure(["compress", f"{name}:net", "--size", "8"], capsys, message.format(i=i))
    with pytest.raises(fxcompress.OptionError, match="factory_"):
        fxcompress.models.load_model(f"{name}:net")


# --- item 10: sizes, counts and fractions -------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["compress", "resnet18", "--size", "-4"], "argument --size: expected an integer >= 1, got '-4'"),
    (["compress", "resnet18", "--size", "0"], "argument --size: expected an integer >= 1, got '0'"),
    (["compress", "resnet18", "--batch", "0"], "argument --batch: expected an integer >= 1, got '0'"),
    (["demo", "resnet18", "--batch", "-1"], "argument --batch: expected an integer >= 1, got '-1'"),
    (["demo", "resnet18", "--repeats", "0"], "argument --repeats: expected an integer >= 1, got '0'"),
    (["bench", "resnet18", "--repeats", "-2"], "argument --repeats: expected an integer >= 1, got '-2'"),
    (["bench", "resnet18", "--batch-sizes", "1,0"], "argument --batch-sizes: expected comma-separated integers "
                                                    ">= 1, got '1,0'"),
    (["bench", "resnet18", "--batch-sizes", "1,,2"], "expected comma-separated integers >= 1, got '1,,2'"),
    (["compress", "resnet18", "--linearize-fraction", "nan"], "argument --linearize-fraction: expected a number "
                                                              "in [0, 1], got 'nan'"),
    (["compress", "resnet18", "--linearize-fraction", "inf"], "expected a number in [0, 1], got 'inf'"),
    (["compress", "resnet18", "--linearize-fraction", "1.5"], "expected a number in [0, 1], got '1.5'"),
    (["compress", "resnet18", "--linearize-fraction", "-0.1"], "expected a number in [0, 1], got '-0.1'"),
])
def test_sizes_counts_and_fractions_out_of_range_are_named(folder, capsys, argv, message):
    assert_clean_failure(argv, capsys, message)


# --- item 10: output paths, checked before any work ---------------------------------------------------------

@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the command gets as far as loading the model."""
    def load_model(reference):
        raise AssertionError("the command started work before checking its output paths")
    monkeypatch.setattr(cli, "load_model", load_model)


@pytest.mark.parametrize("argv, message", [
    (["compress", "resnet18", "--out", "a_file/out"], "--out a_file/out: a_file is a file, not a folder"),
    (["compress", "resnet18", "--out", "a_file"], "--out a_file: a_file is a file, not a folder"),
    (["demo", "resnet18", "--report", "missing/r.json"], "--report missing/r.json: folder missing does not exist"),
    (["demo", "resnet18", "--report", "a_folder"], "--report a_folder is a folder; expected the path of a file"),
    (["bench", "resnet18", "--json", "missing/b.json"], "--json missing/b.json: folder missing does not exist"),
])
def test_output_paths_that_cannot_be_written_are_refused_before_any_work(folder, capsys, no_work, argv, message):
    (folder / "a_file").write_text("x")
    (folder / "a_folder").mkdir()
    assert_clean_failure(argv, capsys, message)


@pytest.mark.parametrize("argv, message", [
    (["compress", "resnet18", "--out", "locked/out"], "--out locked/out: folder locked is not writable"),
    (["demo", "resnet18", "--report", "locked/r.json"], "--report locked/r.json is not writable"),
    (["bench", "resnet18", "--json", "locked/b.json"], "--json locked/b.json is not writable"),
])
def test_unwritable_folders_are_refused_before_any_work(folder, capsys, no_work, monkeypatch, argv, message):
    (folder / "locked").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: real_access(path, mode) and
                        not str(path).endswith("locked"))  # as root, chmod does not lock anything
    assert_clean_failure(argv, capsys, message)


# --- item 10: API options of the wrong type, calibration of the wrong shape or type -------------------------

x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, inputs):
        return torch.relu(self.body(inputs) + inputs)


def block():
    torch.manual_seed(0)
    return randomize_batchnorm(Block()).eval()


@pytest.mark.parametrize("options, message", [
    ({"max_error": "0.1"}, r"option 'max_error' must be a finite number, got '0.1' \(str\)"),
    ({"max_error": "0.1", "criterion": "bn"}, r"option 'max_error' must be a finite number, got '0.1' \(str\)"),
    ({"max_error": math.nan, "criterion": "bn"}, r"option 'max_error' must be a finite number, got nan"),
    ({"max_error": True, "criterion": "bn"}, r"option 'max_error' must be a finite number, got True \(bool\)"),
    ({"criterion": "bn", "planner": {"macs_ratio": "0.5"}},
     r"budget 'macs_ratio' must be a finite number, got '0.5'"),
    ({"criterion": "bn", "planner": {"macs_ratio": math.nan}}, r"budget 'macs_ratio' must be a finite number, got nan"),
    ({"criterion": "bn", "planner": {"max_drop": "1", "evaluator": len}},
     r"budget 'max_drop' must be a finite number, got '1'"),
])
def test_options_of_the_wrong_type_are_named(options, message):
    # Regression: max_error="0.1" gave TypeError: '<=' not supported between 'int' and 'str'.
    with pytest.raises(fxcompress.OptionError, match=message):
        fxcompress.compress(block(), x, **options)


@pytest.mark.parametrize("criterion", ["entropy", "ot"])
@pytest.mark.parametrize("calibration, message", [
    ([x, torch.randn(2, 4, 16, 16)], r"calibration batch 1: input 0 has shape \(2, 4, 16, 16\) float32; "
                                     r"expected \(N, 4, 8, 8\) float32 like the example"),
    ([torch.randn(4, 8, 8)], r"calibration batch 0: input 0 has shape \(4, 8, 8\) float32; expected "
                             r"\(N, 4, 8, 8\) float32"),
    ([x.double()], r"calibration batch 0: input 0 has shape \(2, 4, 8, 8\) float64; expected \(N, 4, 8, 8\) "
                   r"float32"),
    (["a.png", "b.png"], r"calibration batch 0: input 0 is a str; expected a tensor \(N, 4, 8, 8\) float32"),
    ([(x, 3), ("img", 1)], r"calibration batch 1: input 0 is a str; expected a tensor"),
])
def test_calibration_batches_of_the_wrong_shape_or_type_are_named(criterion, calibration, message):
    # Regression: torch's RuntimeError from the replay inside the analysis pass (a list of strings: a
    # TypeError from the first string's characters).
    with pytest.raises(fxcompress.OptionError, match=message):
        fxcompress.compress(block(), x, criterion=criterion, calibration=calibration, planner={"activations": 1})


def test_calibration_batches_of_another_batch_size_are_used():
    result = fxcompress.find_plan(block(), x, criterion="entropy", calibration=[x[:1], torch.randn(5, 4, 8, 8)],
                                  activations=1)
    assert len(result.scores) == 2
