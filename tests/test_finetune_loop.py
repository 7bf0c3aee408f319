"""The fine-tuning loop: each method's trajectory on a tiny budget, stopping rules, resume after a kill, the
`prune` command and its bad inputs. Real Fashion-MNIST, a few batches per step."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision
from torch.utils.data import DataLoader

import fxcompress
from fxcompress import OptionError, Plan
from fxcompress.cli import main as cli_main
from fxcompress.data import FASHION_MNIST_DIR, fashion_mnist_splits
from fxcompress.trainable import plan_of
from fxcompress.finetune.loop import prune
from fxcompress.finetune.run_folder import RunFolder
from fxcompress.finetune.trainer import TrainConfig, collate_fn, evaluate
from fxcompress.models import with_classes

from helpers import randomize_batchnorm
from loop_models import small_cnn

pytestmark = pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST is not installed")
TESTS = Path(__file__).parent
X16 = (torch.randn(1, 3, 16, 16),)
FEW = TrainConfig(max_batches=2, batch_size=16, progress=False)


def tiny_data(size=16):
    return fashion_mnist_splits(size, validation=64, train_samples=96, test_samples=64)


STEP_KEYS = {"step", "decisions", "chosen", "scores", "validation", "test", "activations_linearised", "activations",
             "weight_layers", "depth", "params", "macs", "macs_ratio", "dense_weight_layers", "seconds", "drop",
             "within_tolerance", "blocks_removed", "sparsity"}


def check_trajectory(result, steps):
    trajectory = result.trajectory
    assert [entry["step"] for entry in trajectory.steps] == list(range(steps + 1))
    for entry in trajectory.steps:
        assert set(entry) >= STEP_KEYS
        assert 0 <= entry["validation"] <= 1 and 0 <= entry["test"] <= 1
        assert entry["drop"] == pytest.approx(trajectory.steps[0]["validation"] - entry["validation"])
    linearised = [entry["activations_linearised"] for entry in trajectory.steps]
    assert linearised == sorted(linearised)
    assert linearised[-1] == len(plan_of(result.model).targets("linearize")) or trajectory.kept < steps
    json.dumps(trajectory.to_dict())


@pytest.mark.parametrize("method", ["easier", pytest.param("tlc", marks=pytest.mark.slow),
                                    pytest.param("random", marks=pytest.mark.slow),
                                    pytest.param("control", marks=pytest.mark.slow)])
def test_each_method_records_a_well_formed_trajectory_on_resnet18(method):
    model = randomize_batchnorm(with_classes(torchvision.models.resnet18(), 10)).eval()
    result = prune(model, X16, method=method, data=tiny_data(), train_config=FEW, steps=2, per_step=2,
                   max_drop=1.0, calibration_batches=1)
    check_trajectory(result, 2)
    final = result.trajectory.steps[-1]
    if method == "control":
        assert final["activations_linearised"] == 0 and final["weight_layers"] == result.trajectory.steps[0][
            "weight_layers"]
    else:
        assert final["activations_linearised"] >= 4
        assert len(plan_of(result.model).targets("linearize")) == final["activations_linearised"]
    assert not model.training and type(model) is torchvision.models.ResNet


def test_the_loop_stops_at_the_tolerance_and_keeps_the_last_step_within_it():
    scores = iter([0.9, 0.9, 0.5])

    def finetune(model):
        model(torch.randn(4, 3, 16, 16))

    result = prune(small_cnn(), X16, method="random", finetune=finetune, evaluate=lambda m: next(scores),
                   max_drop=0.1, steps=5)
    steps = result.trajectory.steps
    assert [entry["within_tolerance"] for entry in steps] == [True, True, False]
    assert result.trajectory.kept == 1 and "dropped" in result.trajectory.stopped
    assert len(plan_of(result.model).targets("linearize")) == 1


def test_the_activation_budget_stops_the_loop():
    result = prune(small_cnn(), X16, method="easier", data=tiny_data(), train_config=FEW, activations=2,
                   max_drop=1.0, calibration_batches=1)
    assert result.trajectory.steps[-1]["activations_linearised"] == 2
    assert "budget" in result.trajectory.stopped


def test_bad_loop_options_are_refused():
    with pytest.raises(OptionError, match="unknown method"):
        prune(small_cnn(), X16, method="magic", data=tiny_data())
    with pytest.raises(OptionError, match="max_drop"):
        prune(small_cnn(), X16, data=tiny_data(), max_drop=2)
    with pytest.raises(OptionError, match="either data"):
        prune(small_cnn(), X16, data=tiny_data(), finetune=lambda m: None, evaluate=lambda m: 1.0)


def _prune_command(out, *extra):
    return [sys.executable, "-m", "fxcompress.cli", "prune", "loop_models:small_cnn", "--method", "easier",
            "--size", "16", "--out", str(out), "--steps", "3", "--max-drop", "1", "--train-samples", "256",
            "--validation-samples", "64", "--test-samples", "64", "--batch-size", "16", "--lowering", "eager",
            *extra]


def _run(command):
    return subprocess.run(command, cwd=TESTS, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_run_killed_mid_way_resumes_from_its_checkpoint_and_ends_with_the_same_plan(tmp_path):
    whole = _run(_prune_command(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(_prune_command(interrupted), cwd=TESTS, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not _steps_done(interrupted) >= 2:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = _steps_done(interrupted)
    assert 2 <= done <= 3 and not (interrupted / "plan.json").exists()
    resumed = _run(_prune_command(interrupted, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    trajectory = json.loads((interrupted / "trajectory.json").read_text())
    assert [entry["step"] for entry in trajectory["steps"]] == [0, 1, 2, 3]
    assert Plan.load(interrupted / "plan.json") == Plan.load(tmp_path / "whole" / "plan.json")
    assert len(Plan.load(interrupted / "plan.json").decisions) == 3


def _steps_done(out):
    try:
        return len(json.loads((out / "trajectory.json").read_text())["steps"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


@pytest.mark.slow
def test_the_prune_command_writes_its_outputs(tmp_path):
    completed = _run(_prune_command(tmp_path / "run", "--steps", "1", "--max-batches", "2", "--device", "cpu",
                                    "--save-steps", "--workers", "1", "--quiet", "--static-batch"))
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "step 0:" not in completed.stdout and "%|" not in completed.stderr  # --quiet: no step lines, no bars
    out = tmp_path / "run"
    assert json.loads((out / "trajectory.json").read_text())["training"]["workers"] == 1
    for name in ("trajectory.json", "plan.json", "kept.pt", "model.pt2", "checkpoint.pt", "steps/0.pt", "steps/1.pt"):
        assert (out / name).is_file(), name
    folder = RunFolder(out)
    planned = folder.kept_model()
    assert plan_of(planned).decisions == Plan.load(out / "plan.json").decisions == \
        folder.plan_at(folder.trajectory()["kept"]).decisions
    program = torch.export.load(out / "model.pt2").module()
    with torch.no_grad():
        assert torch.allclose(program(X16[0]), planned.eval()(X16[0]), atol=1e-5)


@pytest.mark.parametrize("extra, message", [
    (("--method", "magic"), "invalid choice: 'magic'"),
    (("--max-drop", "1.5"), "expected a number in [0, 1]"),
    (("--max-drop", "-0.1"), "expected a number in [0, 1]"),
    (("--lacoot-weight", "-1"), "expected a number >= 0"),
    (("--epochs-per-step", "-1"), "expected an integer >= 0"),
    (("--prune-rate", "2"), "expected a number in [0, 1]"),
])
def test_the_prune_command_refuses_bad_options(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(_prune_command(tmp_path / "run", *extra)[3:])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_prune_command_never_overwrites_a_folder_without_resume_or_force(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(TESTS)
    held = tmp_path / "held"
    held.mkdir()
    (held / "notes.txt").write_text("mine")
    assert cli_main(_prune_command(held)[3:]) == 2
    assert "not empty" in capsys.readouterr().err and (held / "notes.txt").read_text() == "mine"
    assert cli_main(_prune_command(tmp_path / "new", "--resume")[3:]) == 2
    assert "no run to resume" in capsys.readouterr().err


def test_the_prune_command_says_when_the_data_set_is_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(TESTS)
    monkeypatch.setattr("fxcompress.data.FASHION_MNIST_DIR", tmp_path / "absent")
    assert cli_main(_prune_command(tmp_path / "run")[3:]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_the_built_in_trainer_takes_data_loaders_as_they_are():
    splits = tiny_data()
    loaders = SimpleNamespace(**{name: DataLoader(getattr(splits, name), batch_size=16, shuffle=name == "train",
                                                  collate_fn=collate_fn(getattr(splits, name), train=False))
                                 for name in ("train", "validation", "test")})
    result = prune(small_cnn(), X16, method="easier", data=loaders, train_config=FEW, steps=1, max_drop=1.0,
                   calibration_batches=1)
    check_trajectory(result, 1)
    assert result.trajectory.steps[1]["test"] == evaluate(result.model, splits.test).accuracy


def test_the_loop_runs_on_its_device_and_its_checkpoints_load_without_that_device(tmp_path, monkeypatch):
    """The loop copies the model and moves the example to `device` (a model on another device than its example
    would not capture); a checkpoint of a GPU run must load on a CPU-only machine: every load maps to the CPU."""
    model = with_classes(torchvision.models.resnet18(), 10).eval()
    prune(model, X16, data=tiny_data(), train_config=FEW, steps=1, max_drop=1.0, device="cpu", out=tmp_path,
          progress=False)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    loads = []
    real_load = torch.load

    def cpu_only_load(path, *args, **kwargs):  # what torch.load does with CUDA tensors where there is no CUDA
        loads.append(kwargs.get("map_location"))
        if kwargs.get("map_location") != "cpu":
            raise RuntimeError("Attempting to deserialize object on a CUDA device but torch.cuda.is_available() "
                               "is False")
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", cpu_only_load)
    resumed = prune(model, X16, data=tiny_data(), train_config=FEW, steps=2, max_drop=1.0, out=tmp_path,
                    resume=True, progress=False)
    assert loads and [entry["step"] for entry in resumed.trajectory.steps] == [0, 1, 2]


def test_resume_refuses_other_settings_naming_both_values_and_keeps_the_record(tmp_path):
    model = with_classes(torchvision.models.resnet18(), 10).eval()
    prune(model, X16, data=tiny_data(), train_config=FEW, steps=1, max_drop=1.0, out=tmp_path, progress=False)
    record = (tmp_path / "trajectory.json").read_text()
    faster = TrainConfig(max_batches=2, batch_size=16, progress=False, lr=0.1)
    with pytest.raises(OptionError, match=r"holds a run with other settings \(lr 0\.01 -> 0\.1\)"):
        prune(model, X16, data=tiny_data(), train_config=faster, steps=2, max_drop=1.0, out=tmp_path, resume=True,
              progress=False)
    with pytest.raises(OptionError, match=r"per_step 1 -> 2"):
        prune(model, X16, data=tiny_data(), train_config=FEW, steps=2, per_step=2, max_drop=1.0, out=tmp_path,
              resume=True, progress=False)
    assert (tmp_path / "trajectory.json").read_text() == record
    resumed = prune(model, X16, data=tiny_data(), train_config=FEW, steps=2, max_drop=1.0, out=tmp_path, resume=True,
                    progress=False)
    assert resumed.trajectory.training["lr"] == 0.01 and resumed.trajectory.settings["steps"] == 2


def test_each_step_records_its_epochs_and_the_logs_and_plot_show_them(tmp_path, capsys):
    from fxcompress.finetune.hooks import CsvLog
    seen = []

    class Watch:
        def on_step(self, entry):
            seen.append(entry["step"])

        def on_end(self, trajectory):
            seen.append(trajectory.stopped)

    result = prune(small_cnn(), X16, data=tiny_data(), train_config=FEW, dense_epochs=1, epochs_per_step=2, steps=1,
                   max_drop=1.0, out=tmp_path, hooks=[CsvLog(tmp_path / "log.csv"), Watch()])
    steps = result.trajectory.steps
    assert [[epoch["epoch"] for epoch in step["epochs"]] for step in steps] == [[0], [1, 2]]
    assert steps[1]["epochs"][0]["lr"] == FEW.lr > steps[1]["epochs"][1]["lr"] > 0  # cosine, per step
    assert all(epoch["loss"] > 0 for step in steps for epoch in step["epochs"])
    assert seen == [0, 1, "1 steps done"]
    assert "step 1: " in capsys.readouterr().out
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert rows[0].startswith("kind,step,validation") and [row.split(",")[0] for row in rows[1:]] == \
        ["epoch", "step", "epoch", "epoch", "step"]
    assert cli_main(["plot", str(tmp_path)]) == 0 and (tmp_path / "trajectory.png").stat().st_size > 1000


def test_the_tensorboard_log_names_its_package_where_it_is_missing(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        from fxcompress.finetune.hooks import TensorBoardLog
        with pytest.raises(fxcompress.MissingDependencyError, match="needs the tensorboard package"):
            TensorBoardLog(tmp_path)
    else:
        pytest.skip("tensorboard is installed")


def test_a_task_carries_the_splits_and_the_example_and_the_cli_names_what_a_task_lacks(tmp_path, monkeypatch):
    from fxcompress.cli import load_task
    task = tiny_data().task(X16)
    assert isinstance(task, fxcompress.Task) and task.example == X16 and task.objective is None
    result = prune(small_cnn(), task.example, data=task, train_config=FEW, steps=1, max_drop=1.0, progress=False)
    assert len(result.trajectory.steps) == 2
    (tmp_path / "my_tasks.py").write_text("from fxcompress.data import fashion_mnist_splits\n"
                                          "def splits_only():\n    return fashion_mnist_splits(16, validation=64)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(OptionError, match=r"returned a Splits without example: return a fxcompress.Task"):
        load_task("my_tasks:splits_only")


def test_each_step_captures_the_model_once_for_scoring_and_applying(monkeypatch):
    from fxcompress import trainable

    class CapturesPerStep:
        def __init__(self):
            self.total, self.at_step = 0, []

        def on_step(self, entry):
            self.at_step.append(self.total)

        def on_end(self, trajectory):
            pass

    counter = CapturesPerStep()

    def counting(*args):
        counter.total += 1
        return fxcompress.capture(*args)

    monkeypatch.setattr(trainable, "capture", counting)
    model = randomize_batchnorm(with_classes(torchvision.models.resnet18(), 10)).eval()
    for method in ("easier", "tlc"):
        counter.total, counter.at_step = 0, []
        prune(model, X16, method=method, data=tiny_data(), train_config=FEW, steps=2, max_drop=1.0,
              calibration_batches=1, hooks=[counter], progress=False)
        assert [after - before for before, after in zip(counter.at_step, counter.at_step[1:])] == [1, 1], method
