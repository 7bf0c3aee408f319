"""Sparse double descent on MNIST with noisy labels, without distillation (`plain`) and with DSD² (`dsd2`), on the
package's fine-tuning loop (`fxcompress.prune`).

  python bench/double_descent.py run plain     LeNet-300-100, iterative global magnitude pruning with rewinding
  python bench/double_descent.py run dsd2      the same, each round distilled from the dense network
  python bench/double_descent.py report        plot (PNG) and summary (Markdown, JSON) of the curves measured

Setting. 20 % of the training labels replaced at random (fixed seed; `noisy_mnist.noisy_labels`: each replaced
label drawn among the 9 other classes, as DSD²'s code does; He et al. draw among all 10, so about 18 % change
there). LeNet-300-100 (784-300-100-10, ReLU), Kaiming-normal weights (OpenLTH's `kaiming_normal`, as He et al.).
The loop's step 0 trains the dense network (plain cross-entropy); each step k >= 1 prunes 20 % of the remaining
weights of all Linear layers by global magnitude (method `magnitude` or `dsd2` with `scope="all"`, the output
layer included, as DSD² prunes every Linear and Conv2d, whereas He et al. leave MNIST's output layer dense;
`collapse=False`: no activation is linearised), rewinds the surviving weights and the biases to their initial
values (`rewind=True`: weight rewinding to initialisation, the lottery-ticket retraining of He et al.) and
retrains with the masks. 31 steps reach 99.90 % sparsity; every step is trained and measured. The loop's
validation split is the noisy training set, so its score is the fit to the noisy labels; the test set keeps its
true labels. Training follows He et al.'s MNIST defaults (OpenLTH `mnist_mlp_300_100`): SGD, lr 0.1 constant,
no momentum, no weight decay, batch 128. DSD²: loss (1 - α)·CE + α·T²·KL(teacher ‖ student) with α = 0.8,
T = 10 (DSD²'s defaults); the teacher is the dense network trained on the same noisy labels with plain
cross-entropy (DSD²'s `main.py` model, which its `kd.py` loads), i.e. the loop's step 0, the same as `plain`'s
(DSD² distils a dense student too; the loop does not).

Scaled down to fit ~15 minutes per curve on one CPU thread: 10,000 training images (a seeded subset of the 60k;
the full test set is kept) and 70 epochs per step instead of the 60k images and 160 epochs of He et al. and
DSD². At this size the dense network still fits the noisy labels, which the double descent needs (measured
before choosing: 0.92 training accuracy on them after 20 epochs, 0.997 after 60; on all 60k images 30 epochs
reach only 0.86). DSD² itself does not rewind (each round retrains the pruned weights with a fresh schedule);
here both curves rewind, as the issue asks.

Each curve is one loop run in bench/runs/double_descent/<curve>/ (not committed; the study's settings beside it in
study.json), resumed where it stopped; its points go to bench/results/double_descent/<curve>.json after every step.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

from fxcompress import prune
from fxcompress.data import Splits
from fxcompress.errors import OptionError
from fxcompress.finetune.methods import METHODS
from fxcompress.finetune.run_folder import RunFolder
from fxcompress.finetune.trainer import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from noisy_mnist import mnist_splits  # noqa: E402

ROOT = Path(__file__).resolve().parent
RUNS = ROOT / "runs" / "double_descent"
RESULTS = ROOT / "results" / "double_descent"
SETTINGS = {"noise": 0.2, "seed": 0, "train_samples": 10000, "rate": 0.2, "epochs": 70, "batch_size": 128,
            "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "max_batches": None}
ROUNDS = 31
CURVES = {"plain": "magnitude", "dsd2": "dsd2"}  # the loop's method of each curve
DIP_THRESHOLD = 0.01  # a dip is reported when a point is at least 1 point below the best on both its sides


def lenet_300_100(seed: int) -> nn.Sequential:
    """784-300-100-10 with ReLU; Kaiming-normal weights, torch's default biases, drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight, generator=generator)
            bound = 1 / math.sqrt(layer.in_features)
            nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return model


def load_splits(settings: dict) -> Splits:
    return mnist_splits(noise=settings["noise"], seed=settings["seed"], train_samples=settings["train_samples"])


def point(entry: dict) -> dict:
    """A curve's point from the loop's record of a step."""
    return {"round": entry["step"], "sparsity": entry["sparsity"], "remaining": 1 - entry["sparsity"],
            "test_accuracy": entry["test"], "train_accuracy_noisy_labels": entry["validation"],
            "seconds": entry["seconds"]}


class CurveFile:
    """The loop's hook that writes the curve's points (those of `earlier` steps, then each new one) to `path`."""

    def __init__(self, path: Path, curve: str, settings: dict, earlier: list[dict], rounds: int):
        self.path, self.curve, self.settings, self.rounds = path, curve, settings, rounds
        self.points = [point(entry) for entry in earlier]

    def on_step(self, entry: dict) -> None:
        self.points.append(point(entry))
        self.write()
        last = self.points[-1]
        print(f"{self.curve} round {last['round']}/{self.rounds}: sparsity {last['sparsity']:.2%}, test "
              f"{last['test_accuracy']:.4f}, train (noisy labels) {last['train_accuracy_noisy_labels']:.4f}, "
              f"{last['seconds']} s", flush=True)

    def on_end(self, trajectory) -> None:
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".json.partial")
        partial.write_text(json.dumps({"curve": self.curve, "settings": self.settings, "points": self.points},
                                      indent=1))
        partial.replace(self.path)


def settings_of(curve: str, overrides: dict) -> dict:
    if curve not in CURVES:
        raise OptionError(f"unknown curve {curve!r}; valid: {', '.join(CURVES)}")
    return {**SETTINGS, **overrides}


def run(curve: str, rounds: int = ROUNDS, runs: Path = RUNS, results: Path = RESULTS, **overrides) -> dict:
    """Measure `curve` up to round `rounds` (0 = dense) on the loop, resuming its run; returns the results."""
    settings = settings_of(curve, overrides)
    folder = runs / curve
    _keep_settings(folder, settings)
    splits = load_splits(settings)
    training = TrainConfig(lr=settings["lr"], momentum=settings["momentum"], weight_decay=settings["weight_decay"],
                           schedule="constant", batch_size=settings["batch_size"], max_batches=settings["max_batches"],
                           progress=False)
    earlier = (RunFolder(folder).trajectory() or {"steps": []})["steps"]
    curve_file = CurveFile(results / f"{curve}.json", curve, settings, earlier, rounds)
    prune(lenet_300_100(settings["seed"]), torch.zeros(1, 784),
          method=METHODS[CURVES[curve]](rate=settings["rate"], scope="all", collapse=False),
          data=Splits(splits.train, splits.train, splits.test, size=28), train_config=training, out=folder,
          resume=True, steps=rounds, dense_epochs=settings["epochs"], epochs_per_step=settings["epochs"],
          max_drop=1.0, rewind=True, calibration_batches=1, seed=settings["seed"], device="cpu", progress=False,
          hooks=(curve_file,))
    return json.loads(curve_file.path.read_text())


def _keep_settings(folder: Path, settings: dict) -> None:
    """Write the study's settings beside its run (the loop records its own, not the data's); refuse others."""
    path = folder / "study.json"
    if path.is_file() and (saved := json.loads(path.read_text())) != settings:
        changed = sorted(key for key in settings if saved.get(key) != settings[key])
        raise OptionError(f"{folder} was run with other settings ({', '.join(changed)}): delete it or give another "
                          "--runs folder")
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings))


def dip(points: list[dict]) -> dict:
    """The point furthest below the best accuracy on both its sides (lower and higher sparsity): its depth is
    min(best before, best after) - its accuracy (0 when the curve never goes down and up again)."""
    accuracy = [point["test_accuracy"] for point in points]
    best = {"depth": 0.0, "round": None}
    for index in range(1, len(points) - 1):
        before, after = max(accuracy[:index]), max(accuracy[index + 1:])
        depth = min(before, after) - accuracy[index]
        if depth > best["depth"]:
            peak = max(range(index + 1, len(points)), key=accuracy.__getitem__)
            best = {"depth": depth, "round": points[index]["round"], "sparsity": points[index]["sparsity"],
                    "accuracy": accuracy[index], "best_before": before, "best_after": after,
                    "best_after_sparsity": points[peak]["sparsity"]}
    return {**best, "dip": best["depth"] >= DIP_THRESHOLD, "dense_accuracy": accuracy[0],
            "best_accuracy": max(accuracy), "best_sparsity": points[accuracy.index(max(accuracy))]["sparsity"]}


def report(results: Path = RESULTS) -> dict:
    """double_descent.png, summary.md and summary.json from the curves' JSON files in `results`."""
    curves = {curve: json.loads((results / f"{curve}.json").read_text())
              for curve in CURVES if (results / f"{curve}.json").is_file()}
    if not curves:
        raise OptionError(f"no curve measured in {results}: run `python bench/double_descent.py run plain` first")
    summary = {curve: {"rounds": len(result["points"]) - 1, **dip(result["points"])} if len(result["points"]) > 2
               else {"rounds": len(result["points"]) - 1} for curve, result in curves.items()}
    _plot(curves, results / "double_descent.png")
    (results / "summary.json").write_text(json.dumps(summary, indent=1))
    (results / "summary.md").write_text(_markdown(curves, summary))
    print((results / "summary.md").read_text())
    return summary


def _plot(curves: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (test_axis, train_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for curve, result in curves.items():
        left = [100 * point["remaining"] for point in result["points"]]
        test_axis.plot(left, [100 * point["test_accuracy"] for point in result["points"]], "o-", ms=3, label=curve)
        train_axis.plot(left, [100 * point["train_accuracy_noisy_labels"] for point in result["points"]], "o-",
                        ms=3, label=curve)
    for axis, title in ((test_axis, "test accuracy (true labels)"),
                        (train_axis, "training accuracy (20 % noisy labels)")):
        axis.set_xscale("log")
        axis.invert_xaxis()
        axis.set_xlabel("weights remaining (%), log scale")
        axis.set_ylabel("accuracy (%)")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.suptitle("LeNet-300-100, MNIST, iterative global magnitude pruning with rewinding")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _markdown(curves: dict, summary: dict) -> str:
    names = list(curves)
    rows = ["| round | sparsity | " + " | ".join(f"{name} test | {name} train (noisy)" for name in names) + " |",
            "|---|---|" + "---|---|" * len(names)]
    for round_ in range(max(len(result["points"]) for result in curves.values())):
        sparsity = next(result["points"][round_]["sparsity"] for result in curves.values()
                        if round_ < len(result["points"]))
        cells = []
        for name in names:
            points = curves[name]["points"]
            cells += ([f"{points[round_]['test_accuracy']:.4f}", f"{points[round_]['train_accuracy_noisy_labels']:.4f}"]
                      if round_ < len(points) else ["", ""])
        rows.append(f"| {round_} | {sparsity:.2%} | " + " | ".join(cells) + " |")
    lines = ["# Sparse double descent: LeNet-300-100 on MNIST, 20 % noisy training labels", "",
             "Produced by `python bench/double_descent.py report`; settings in the module docstring and in each "
             "curve's JSON.", ""]
    for name in names:
        lines.append(f"- **{name}**: {_verdict(summary[name])}")
    return "\n".join(lines + ["", *rows, ""])


def _verdict(summary: dict) -> str:
    if "dip" not in summary:
        return f"{summary['rounds']} rounds measured so far."
    head = (f"{summary['rounds']} rounds; dense test accuracy {summary['dense_accuracy']:.4f}, best "
            f"{summary['best_accuracy']:.4f} at {summary['best_sparsity']:.2%} sparsity.")
    if summary["round"] is None:
        return f"{head} No point lies below the best accuracy on both sides: no dip."
    shape = (f"deepest point {summary['accuracy']:.4f} at {summary['sparsity']:.2%} sparsity, "
             f"{100 * summary['depth']:.2f} points below min(best before {summary['best_before']:.4f}, best after "
             f"{summary['best_after']:.4f} at {summary['best_after_sparsity']:.2%})")
    verdict = "a dip" if summary["dip"] else f"no dip (threshold {100 * DIP_THRESHOLD:.0f} point)"
    return f"{head} {verdict.capitalize()}: {shape}."


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="measure one curve (resumes)")
    run_parser.add_argument("curve", choices=sorted(CURVES))
    run_parser.add_argument("--rounds", type=int, default=ROUNDS, help="last pruning round (20 %% each)")
    run_parser.add_argument("--epochs", type=int, default=SETTINGS["epochs"], help="epochs per round")
    run_parser.add_argument("--train-samples", type=int, default=SETTINGS["train_samples"])
    run_parser.add_argument("--max-batches", type=int, default=None, help="cap on batches per epoch (smoke runs)")
    run_parser.add_argument("--runs", type=Path, default=RUNS, help="checkpoint folder")
    run_parser.add_argument("--results", type=Path, default=RESULTS, help="results folder (JSON)")
    report_parser = commands.add_parser("report", help="plot and summary of the curves measured")
    report_parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.command == "run":
        run(args.curve, args.rounds, args.runs, args.results, epochs=args.epochs, train_samples=args.train_samples,
            max_batches=args.max_batches)
    else:
        report(args.results)


if __name__ == "__main__":
    sys.exit(main())
