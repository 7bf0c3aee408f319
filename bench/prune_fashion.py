"""Shallower at equal accuracy on Fashion-MNIST: dense models, one `fxcompress prune` run per method, plots.

  python bench/prune_fashion.py dense MODEL            train the dense model once (MODEL: mobilenet_v2, resnet18)
  python bench/prune_fashion.py run MODEL METHOD       one method's loop through the `fxcompress prune` command
  python bench/prune_fashion.py latency MODEL          batch-1 latency ratios of each run's steps (ONNX Runtime,
                                                       Inductor) at the run's size and at 224
  python bench/prune_fashion.py report                 plots (PNG) and the summary table (Markdown) of all runs

Every command is resumable: `dense` skips a model already trained, `run` resumes its run folder. Runs live in
bench/runs/ (not committed); results (trajectories, plans, latency, plots, table) go to bench/results/prune/.
MobileNetV2 starts from its ImageNet weights (head replaced for 10 classes), ResNet-18 from random weights.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
RUNS = ROOT / "runs"
RESULTS = ROOT / "results" / "prune"
SIZE = 64
DATA = {"validation": 2000, "train_samples": 3000, "test_samples": 5000, "batch_size": 64}
DENSE = {"mobilenet_v2": {"epochs": 2, "train_samples": 12000, "lr": 0.01},
         "resnet18": {"epochs": 4, "train_samples": 12000, "lr": 0.05}}
LOOP = {"mobilenet_v2": {"per_step": 2, "steps": 17}, "resnet18": {"per_step": 1, "steps": 16}}
CONTROL_STEPS = 10  # the control fine-tunes as long as a method's run usually lasts
METHODS = ("easier", "tlc", "random", "control", "easier-latency", "tlc-latency")  # -latency: selection latency
MAX_DROP = 0.03  # the loop goes on past 1 point, so that the plots show where accuracy falls; the table
# reports the last step within 1 point


def base_model(name: str) -> torch.nn.Module:
    from fxcompress.models import pretrained_mobilenet_v2, torchvision_model, with_classes
    model = pretrained_mobilenet_v2() if name == "mobilenet_v2" else torchvision_model(name)
    return with_classes(model, 10)


def dense_path(name: str) -> Path:
    return RUNS / name / "dense.pt"


def mobilenet_v2():
    """The dense fine-tuned MobileNetV2 (the CLI's MODEL: `bench.prune_fashion:mobilenet_v2`)."""
    return _dense("mobilenet_v2")


def resnet18():
    return _dense("resnet18")


def _dense(name: str) -> torch.nn.Module:
    model = base_model(name)
    model.load_state_dict(torch.load(dense_path(name), map_location="cpu", weights_only=True))
    return model.eval()


def dense(name: str) -> None:
    from fxcompress.data import fashion_mnist_splits
    from fxcompress.finetune.trainer import TrainConfig, evaluate, train
    path = dense_path(name)
    if path.is_file():
        print(f"{path} exists")
        return
    settings = DENSE[name]
    splits = fashion_mnist_splits(SIZE, validation=DATA["validation"], train_samples=settings["train_samples"],
                                  test_samples=DATA["test_samples"], flip=True)
    model = base_model(name)
    train(model, splits.train, TrainConfig(lr=settings["lr"], batch_size=DATA["batch_size"]), settings["epochs"],
          seed=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    result = {"model": name, "size": SIZE, **settings, "validation": evaluate(model, splits.validation).accuracy,
              "test": evaluate(model, splits.test).accuracy}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}_dense.json").write_text(json.dumps(result, indent=2))
    print(result)


def run(name: str, method: str) -> None:
    folder = RUNS / name / method
    loop = LOOP[name]
    command = [sys.executable, "-m", "fxcompress.cli", "prune", f"bench.prune_fashion:{name}",
               "--method", method.removesuffix("-latency"), "--selection", "latency" if "-latency" in method else "criterion",
               "--size", str(SIZE), "--out", str(folder), "--max-drop", str(MAX_DROP),
               "--steps", str(CONTROL_STEPS if method == "control" else loop["steps"]), "--per-step", str(loop["per_step"]),
               "--train-samples", str(DATA["train_samples"]), "--validation-samples", str(DATA["validation"]),
               "--test-samples", str(DATA["test_samples"]), "--batch-size", str(DATA["batch_size"]),
               "--lowering", "onnxruntime"]
    if (folder / "checkpoint.pt").is_file():
        command.append("--resume")
    subprocess.run(command, check=True, cwd=ROOT.parent, env={**os.environ, "OMP_NUM_THREADS": "1"})
    RESULTS.mkdir(parents=True, exist_ok=True)
    for source, target in (("trajectory.json", f"{name}_{method}.json"), ("plan.json", f"{name}_{method}_plan.json")):
        shutil.copy(folder / source, RESULTS / target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["dense", "run", "latency", "report"])
    parser.add_argument("model", nargs="?", choices=list(DENSE))
    parser.add_argument("method", nargs="?", choices=list(METHODS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.command == "dense":
        dense(args.model)
    elif args.command == "run":
        run(args.model, args.method)


if __name__ == "__main__":
    main()
