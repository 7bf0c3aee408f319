"""Sparse double descent on MNIST with noisy labels, without distillation (`plain`) and with DSD² (`dsd2`).

  python bench/double_descent.py run plain     LeNet-300-100, iterative global magnitude pruning with rewinding
  python bench/double_descent.py run dsd2      the same, each round distilled from the dense teacher
  python bench/double_descent.py report        plot (PNG) and summary (Markdown, JSON) of the curves measured

Setting. 20 % of the training labels replaced at random (fixed seed; `noisy_mnist.noisy_labels`: each replaced
label drawn among the 9 other classes, as DSD²'s code does; He et al. draw among all 10, so about 18 % change
there). LeNet-300-100 (784-300-100-10, ReLU), Kaiming-normal weights (OpenLTH's `kaiming_normal`, as He et al.).
Round 0 trains the dense network; each round k >= 1 prunes 20 % of the remaining weights of all Linear layers by
global magnitude (`torch.nn.utils.prune.global_unstructured`, L1Unstructured; the output layer included, as DSD²
prunes every Linear and Conv2d, whereas He et al. leave MNIST's output layer dense), rewinds the surviving
weights and the biases to their initial values (weight rewinding to initialisation, the lottery-ticket retraining
of He et al.) and retrains with the masks. 31 rounds reach 99.90 % sparsity; every round is trained and measured.
Training follows He et al.'s MNIST defaults (OpenLTH `mnist_mlp_300_100`): SGD, lr 0.1 constant, no momentum, no
weight decay, batch 128. DSD²: loss (1 - α)·CE + α·T²·KL(teacher ‖ student) with α = 0.8, T = 10 (DSD²'s
defaults); the teacher is the dense network trained on the same noisy labels with plain cross-entropy (DSD²'s
`main.py` model, which its `kd.py` loads), i.e. the `plain` curve's round 0; the dense student is distilled too.

Scaled down to fit ~25 minutes per curve on one CPU thread: 10,000 training images (a seeded subset of the 60k;
the full test set is kept) and 70 epochs per round instead of the 60k images and 160 epochs of He et al. and
DSD². At this size the dense network still fits the noisy labels, which the double descent needs (measured
before choosing: 0.92 training accuracy on them after 20 epochs, 0.997 after 60; the `plain` run's dense round:
0.9993 after 70; on all 60k images 30 epochs reach only 0.86). DSD² itself does not rewind (each round
retrains the pruned weights with a fresh schedule); here both curves rewind, as the issue asks.

Every round is saved (checkpoint with masks, trained and initial weights, the teacher and the points so far, in
bench/runs/double_descent/, not committed; the points as JSON in bench/results/double_descent/), and rerunning
`run` continues after the last saved round. Round k's shuffling is seeded with `seed + k`, so a resumed run
gives the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from fxcompress.errors import OptionError
from fxcompress.finetune.sparsity import current_mask, plain_state_dict, set_masks
from fxcompress.finetune.trainer import TrainConfig, evaluate, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from noisy_mnist import mnist_splits  # noqa: E402

ROOT = Path(__file__).resolve().parent
RUNS = ROOT / "runs" / "double_descent"
RESULTS = ROOT / "results" / "double_descent"
SETTINGS = {"noise": 0.2, "seed": 0, "train_samples": 10000, "rate": 0.2, "epochs": 70, "batch_size": 128,
            "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "max_batches": None}
ROUNDS = 31
CURVES = {"plain": {"distill": 0.0}, "dsd2": {"distill": 0.8, "temperature": 10.0}}
DIP_THRESHOLD = 0.01  # a dip is reported when a point is at least 1 point below the best on both its sides


def lenet_300_100(seed: int) -> nn.Sequential:
    """784-300-100-10 with ReLU; Kaiming-normal weights, torch's default biases, drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)]
    model = nn.Sequential(*layers)
    for layer in linear_layers(model):
        nn.init.kaiming_normal_(layer.weight, generator=generator)
        bound = 1 / math.sqrt(layer.in_features)
        nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return model


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    return [module for module in model.modules() if isinstance(module, nn.Linear)]


def prune_round(model: nn.Module, rate: float) -> None:
    """Prune `rate` of the remaining weights of all Linear layers together, smallest magnitudes first (masks
    accumulate over rounds)."""
    prune.global_unstructured([(layer, "weight") for layer in linear_layers(model)],
                              pruning_method=prune.L1Unstructured, amount=rate)


def rewind(model: nn.Module, initial: dict[str, torch.Tensor]) -> None:
    """Set every weight (under its mask, if pruned) and bias back to `initial` (a dense model's state_dict)."""
    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, nn.Linear):
                getattr(layer, "weight_orig", layer.weight).copy_(initial[f"{name}.weight"])
                layer.bias.copy_(initial[f"{name}.bias"])


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """{layer name: its weight mask} (all True for a layer not pruned yet)."""
    return {name: current_mask(layer) for name, layer in model.named_modules() if isinstance(layer, nn.Linear)}


def remaining(model: nn.Module) -> tuple[int, int]:
    """(weights kept, weights) over the Linear layers' weights (biases are never pruned and not counted)."""
    kept = [mask for mask in masks(model).values()]
    return int(sum(mask.sum().item() for mask in kept)), sum(mask.numel() for mask in kept)


def dense_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as a dense state_dict (masks folded in: pruned weights are zeros), copied."""
    return {key: value.clone() for key, value in plain_state_dict(model).items()}


def restore(weights: dict[str, torch.Tensor], layer_masks: dict[str, torch.Tensor]) -> nn.Module:
    """A LeNet-300-100 holding `weights` (dense state), pruned by the masks of `layer_masks` that have zeros."""
    model = lenet_300_100(0)
    model.load_state_dict(weights)
    set_masks(model, {name: mask for name, mask in layer_masks.items() if not bool(mask.all())})
    return model


def batches(dataset, batch_size: int, seed: int) -> DataLoader:
    """Shuffled full batches, each gathered by one tensor index (a TensorDataset indexed by a list of indices)."""
    sampler = BatchSampler(RandomSampler(dataset, generator=torch.Generator().manual_seed(seed)), batch_size,
                           drop_last=True)
    return DataLoader(dataset, sampler=sampler, batch_size=None)


def load_splits(settings: dict):
    return mnist_splits(noise=settings["noise"], seed=settings["seed"], train_samples=settings["train_samples"])


def train_round(model: nn.Module, splits, settings: dict, seed: int, teacher: nn.Module | None) -> dict:
    """Train with the settings (distilling from `teacher` when given) and measure; returns the point's numbers."""
    distill = {"distill": settings["distill"], "temperature": settings["temperature"]} if teacher is not None else {}
    config = TrainConfig(lr=settings["lr"], momentum=settings["momentum"], weight_decay=settings["weight_decay"],
                         schedule="constant", batch_size=settings["batch_size"], max_batches=settings["max_batches"],
                         progress=False, **distill)
    start = time.perf_counter()
    history = train(model, batches(splits.train, settings["batch_size"], seed), config, settings["epochs"],
                    seed=seed, teacher=teacher)
    test = evaluate(model, splits.test, batch_size=1000)
    fit = evaluate(model, splits.train, batch_size=1000)
    kept, total = remaining(model)
    return {"weights_kept": kept, "weights": total, "remaining": kept / total, "sparsity": 1 - kept / total,
            "test_accuracy": test.accuracy, "test_loss": test.loss, "train_accuracy_noisy_labels": fit.accuracy,
            "last_epoch_loss": history["epoch_losses"][-1], "seconds": round(time.perf_counter() - start, 1)}


def settings_of(curve: str, overrides: dict) -> dict:
    if curve not in CURVES:
        raise OptionError(f"unknown curve {curve!r}; valid: {', '.join(CURVES)}")
    return {**SETTINGS, "distill": 0.0, "temperature": 1.0, **CURVES[curve], **overrides}


def run(curve: str, rounds: int = ROUNDS, runs: Path = RUNS, results: Path = RESULTS, **overrides) -> dict:
    """Measure `curve` up to round `rounds` (0 = dense), resuming its checkpoint; returns the results."""
    settings = settings_of(curve, overrides)
    checkpoint = runs / f"{curve}.pt"
    state = _resume(checkpoint, settings) or {"settings": settings, "points": [], "teacher": None,
                                               "initial": dense_state(lenet_300_100(settings["seed"]))}
    splits = load_splits(settings)
    teacher = _teacher(state, splits, checkpoint) if settings["distill"] else None
    for round_ in range(len(state["points"]), rounds + 1):
        model = _next_model(state, round_)
        point = {"round": round_, **train_round(model, splits, settings, settings["seed"] + round_, teacher)}
        state.update(points=state["points"] + [point], weights=dense_state(model), masks=masks(model))
        _save(checkpoint, state)
        _write_results(results / f"{curve}.json", curve, state)
        print(f"{curve} round {round_}/{rounds}: sparsity {point['sparsity']:.2%}, test {point['test_accuracy']:.4f}"
              f", train (noisy labels) {point['train_accuracy_noisy_labels']:.4f}, {point['seconds']} s", flush=True)
    _write_results(results / f"{curve}.json", curve, state)
    return json.loads((results / f"{curve}.json").read_text())


def _next_model(state: dict, round_: int) -> nn.Module:
    if round_ == 0:
        return restore(state["initial"], {})
    model = restore(state["weights"], state["masks"])
    prune_round(model, state["settings"]["rate"])
    rewind(model, state["initial"])
    return model


def _teacher(state: dict, splits, checkpoint: Path) -> nn.Module:
    """The dense network trained on the noisy labels with plain cross-entropy (round 0 of `plain`), trained once
    and kept in the checkpoint."""
    settings = state["settings"]
    if state["teacher"] is None:
        model = lenet_300_100(settings["seed"])
        point = train_round(model, splits, {**settings, "distill": 0.0}, settings["seed"], None)
        state.update(teacher={"weights": dense_state(model), "point": point})
        _save(checkpoint, state)
        print(f"teacher: test {point['test_accuracy']:.4f}, train (noisy labels) "
              f"{point['train_accuracy_noisy_labels']:.4f}, {point['seconds']} s", flush=True)
    return restore(state["teacher"]["weights"], {}).eval()


def _resume(checkpoint: Path, settings: dict) -> dict | None:
    if not checkpoint.is_file():
        return None
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if state["settings"] != settings:
        changed = sorted(key for key in settings if state["settings"].get(key) != settings[key])
        raise OptionError(f"{checkpoint} was run with other settings ({', '.join(changed)}): delete it or give "
                          f"another --runs folder")
    return state


def _save(checkpoint: Path, state: dict) -> None:
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    partial = checkpoint.with_suffix(".pt.partial")
    torch.save(state, partial)
    os.replace(partial, checkpoint)


def _write_results(path: Path, curve: str, state: dict) -> None:
    teacher = state["teacher"]["point"] if state["teacher"] else None
    result = {"curve": curve, "settings": state["settings"], "teacher": teacher, "points": state["points"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(result, indent=1))
    os.replace(partial, path)


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
        lines.append(f"- **{name}**: {_verdict(summary[name], curves[name])}")
    return "\n".join(lines + ["", *rows, ""])


def _verdict(summary: dict, result: dict) -> str:
    teacher = result["teacher"]
    told = f" Teacher (dense, plain CE): test {teacher['test_accuracy']:.4f}." if teacher else ""
    if "dip" not in summary:
        return f"{summary['rounds']} rounds measured so far.{told}"
    head = (f"{summary['rounds']} rounds; dense test accuracy {summary['dense_accuracy']:.4f}, best "
            f"{summary['best_accuracy']:.4f} at {summary['best_sparsity']:.2%} sparsity.")
    if summary["round"] is None:
        return f"{head} No point lies below the best accuracy on both sides: no dip.{told}"
    shape = (f"deepest point {summary['accuracy']:.4f} at {summary['sparsity']:.2%} sparsity, "
             f"{100 * summary['depth']:.2f} points below min(best before {summary['best_before']:.4f}, best after "
             f"{summary['best_after']:.4f} at {summary['best_after_sparsity']:.2%})")
    verdict = "a dip" if summary["dip"] else f"no dip (threshold {100 * DIP_THRESHOLD:.0f} point)"
    return f"{head} {verdict.capitalize()}: {shape}.{told}"


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
