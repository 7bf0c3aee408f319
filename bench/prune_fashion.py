"""Shallower at equal accuracy on Fashion-MNIST: dense models, one `fxcompress prune` run per method, plots.

  python bench/prune_fashion.py dense MODEL            train the dense model once (MODEL: mobilenet_v2, resnet18)
  python bench/prune_fashion.py run MODEL METHOD       one method's loop through the `fxcompress prune` command
  python bench/prune_fashion.py latency MODEL          batch-1 latency ratio against the dense model of each
                                                       run's steps on ONNX Runtime at the run's size; of each
                                                       run's step within 1 point also at 224 and on Inductor
  python bench/prune_fashion.py report                 plots (PNG) and the summary table (Markdown) of all runs
  python bench/prune_fashion.py egp-split MODEL        the share of each layer that EGP's first round prunes

Every command is resumable: `dense` skips a model already trained, `run` resumes its run folder, `latency`
skips what it measured. Runs live in bench/runs/ (not committed); results (trajectories, plans, latency,
plots, table) go to bench/results/prune/. A compressed model's latency depends on its plan, not on its
weights, so the latency of every step is measured on the dense model compressed with that step's plan.
MobileNetV2 starts from its ImageNet weights (head replaced for 10 classes), ResNet-18 from random weights.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trajectories  # noqa: E402
from trajectories import lacoot_weight, read_trajectory, within_one_point  # noqa: E402

from fxcompress.finetune.run_folder import plan_until  # noqa: E402

ROOT = Path(__file__).resolve().parent
RUNS = ROOT / "runs"
RESULTS = ROOT / "results" / "prune"
SIZE = 64
DATA = {"validation": 2000, "train_samples": 3000, "test_samples": 5000, "batch_size": 64}
DENSE = {"mobilenet_v2": {"epochs": 2, "train_samples": 12000, "lr": 0.01},
         "resnet18": {"epochs": 4, "train_samples": 12000, "lr": 0.05}}
LOOP = {"mobilenet_v2": {"per_step": 2, "steps": 17}, "resnet18": {"per_step": 1, "steps": 16}}
LACOOT_EPOCHS = 2  # training with (or without) LaCoOT's regulariser before removing blocks
LACOOT_WEIGHT = {"mobilenet_v2": 9.0, "resnet18": 5.0}  # the published lambdas
BLOCKS = {"mobilenet_v2": 10, "resnet18": 5}  # residual blocks with an identity shortcut
PRUNE_ROUNDS = 7  # 50 % per round: 99.2 % of the pruned layers' weights after 7
CONTROL_STEPS = 10  # the control fine-tunes as long as a method's run usually lasts
MAX_DROP_CURVE = 0.03  # the methods' runs go on past 1 point, so that the plots show where accuracy falls; the
# table reports their last step within 1 point
# Each run: the method and the settings that differ from the defaults (selection criterion, 1 epoch per step,
# no distillation, DATA's validation split, MAX_DROP_CURVE). The latency-aware variants stop at 1 point.
RUNS_OF = {
    "easier": {"method": "easier"},
    "tlc": {"method": "tlc"},
    "random": {"method": "random"},
    "control": {"method": "control", "steps": CONTROL_STEPS},
    "easier-latency": {"method": "easier", "selection": "latency", "max_drop": 0.01},
    "tlc-latency": {"method": "tlc", "selection": "latency", "max_drop": 0.01},
    "easier-latency-long": {"method": "easier", "selection": "latency", "epochs": 3, "max_drop": 0.01},
    "easier-latency-kd": {"method": "easier", "selection": "latency", "epochs": 3, "distill": 0.7,
                          "max_drop": 0.01},
    "easier-latency-kd-val5k": {"method": "easier", "selection": "latency", "epochs": 3, "distill": 0.7,
                                "max_drop": 0.01, "validation": 5000},
    # LaCoOT: train with the regulariser (lambda > 0) or without (the baseline), then remove blocks one per step,
    # smallest distance first, without fine-tuning; to the end, so that the curves show where accuracy falls
    "lacoot": {"method": "lacoot", "dense_epochs": LACOOT_EPOCHS, "epochs": 0, "max_drop": 1.0, "per_step": 1},
    "lacoot-1": {"method": "lacoot", "lacoot_weight": 1.0, "dense_epochs": LACOOT_EPOCHS, "epochs": 0,
                 "max_drop": 1.0, "per_step": 1},
    "lacoot-0": {"method": "lacoot", "lacoot_weight": 0.0, "dense_epochs": LACOOT_EPOCHS, "epochs": 0,
                 "max_drop": 1.0, "per_step": 1},
    "lacoot-long": {"method": "lacoot", "dense_epochs": 3 * LACOOT_EPOCHS, "epochs": 0, "max_drop": 1.0,
                    "per_step": 1},
    "lacoot-0-long": {"method": "lacoot", "lacoot_weight": 0.0, "dense_epochs": 3 * LACOOT_EPOCHS, "epochs": 0,
                      "max_drop": 1.0, "per_step": 1},
    # unstructured pruning rounds of 50 % of the remaining weights: EGP's split against global magnitude
    "egp": {"method": "egp", "steps": PRUNE_ROUNDS, "max_drop": 1.0, "per_step": 1},
    "magnitude": {"method": "magnitude", "steps": PRUNE_ROUNDS, "max_drop": 1.0, "per_step": 1},
}
METHODS = tuple(RUNS_OF)


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
    settings = RUNS_OF[method]
    steps = BLOCKS[name] if settings["method"] == "lacoot" else settings.get("steps", loop["steps"])
    command = [sys.executable, "-m", "fxcompress.cli", "prune", f"bench.prune_fashion:{name}",
               "--method", settings["method"], "--selection", settings.get("selection", "criterion"),
               "--epochs-per-step", str(settings.get("epochs", 1)), "--distill", str(settings.get("distill", 0)),
               "--max-drop", str(settings.get("max_drop", MAX_DROP_CURVE)), "--steps", str(steps),
               "--per-step", str(settings.get("per_step", loop["per_step"])),
               "--dense-epochs", str(settings.get("dense_epochs", 0)),
               "--size", str(SIZE), "--out", str(folder), "--train-samples", str(DATA["train_samples"]),
               "--validation-samples", str(settings.get("validation", DATA["validation"])),
               "--test-samples", str(DATA["test_samples"]), "--batch-size", str(DATA["batch_size"]),
               "--lowering", "onnxruntime"]
    if settings["method"] == "lacoot":
        command += ["--lacoot-weight", str(settings.get("lacoot_weight", LACOOT_WEIGHT[name]))]
    if (folder / "checkpoint.pt").is_file():
        command.append("--resume")
    subprocess.run(command, check=True, cwd=ROOT.parent, env={**os.environ, "OMP_NUM_THREADS": "1"})
    RESULTS.mkdir(parents=True, exist_ok=True)
    for source, target in (("trajectory.json", f"{name}_{method}.json"), ("plan.json", f"{name}_{method}_plan.json")):
        shutil.copy(folder / source, RESULTS / target)


def trajectory(name: str, method: str) -> dict | None:
    return read_trajectory(RESULTS / f"{name}_{method}.json")


PROGRESS = {**{run: "blocks_removed" for run, settings in RUNS_OF.items() if settings["method"] == "lacoot"},
            "egp": "sparsity", "magnitude": "sparsity"}


def progress_key(method: str) -> str:
    """What a method's steps remove: blocks (LaCoOT), weights (pruning), else activations."""
    return PROGRESS.get(method, "activations_linearised")


def latency_ratio(model, plan, size: int, lowering: str) -> float:
    example = (torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)),)
    return trajectories.latency_ratio(model, plan, example, lowering)


INDUCTOR_MODELS = ("mobilenet_v2",)  # ResNet-18 merges nothing (3x3 after 3x3 would cost more): ORT only


def latency(name: str) -> None:
    path = RESULTS / f"{name}_latency.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    model = _dense(name)
    exact = results.setdefault("exact passes only", {})  # the dense model, BatchNorms folded: what folding gives
    for size, lowering in ((SIZE, "onnxruntime"), (224, "onnxruntime"), (SIZE, "inductor"), (224, "inductor")):
        if f"{lowering}_{size}" not in exact and (lowering == "onnxruntime" or name in INDUCTOR_MODELS):
            exact[f"{lowering}_{size}"] = latency_ratio(model, None, size, lowering)
            path.write_text(json.dumps(results, indent=2))
    for method in METHODS:
        steps = (trajectory(name, method) or {}).get("steps")
        if not steps:
            continue
        entry = results.setdefault(method, {"onnxruntime": {}})
        for step in steps:
            key = str(step["step"])
            if key not in entry["onnxruntime"]:
                entry["onnxruntime"][key] = latency_ratio(model, plan_until(steps, step["step"]), SIZE, "onnxruntime")
                path.write_text(json.dumps(results, indent=2))
        kept = str(within_one_point(steps, progress_key(method))["step"])
        fields = [("onnxruntime_224", 224, "onnxruntime")]
        if name in INDUCTOR_MODELS and method != "control":
            fields += [("inductor", SIZE, "inductor"), ("inductor_224", 224, "inductor")]
        for field, size, lowering in fields:
            if entry.get(field, {}).get("step") != kept:
                entry[field] = {"step": kept, "ratio": latency_ratio(model, plan_until(steps, int(kept)), size,
                                                                      lowering)}
                path.write_text(json.dumps(results, indent=2))
        print(name, method, entry)


def _ratio(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def report() -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = ["| model | method | step-0 test | step within 1 pt | activations linearised | blocks removed | "
            "sparsity | weight layers | test | ORT ratio 64 / 224 | Inductor ratio 64 / 224 |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in DENSE:
        timing = json.loads((RESULTS / f"{name}_latency.json").read_text()) \
            if (RESULTS / f"{name}_latency.json").is_file() else {}
        figure, ((by_depth, by_latency), (by_blocks, by_sparsity)) = plt.subplots(2, 2, figsize=(12, 9))
        for method in METHODS:
            data = trajectory(name, method)
            if data is None:
                continue
            steps = data["steps"]
            accuracy = [100 * step["test"] for step in steps]
            control = method == "control"
            key = progress_key(method)
            label = f"{method} (lambda {lacoot_weight(data['settings']):g})" if key == "blocks_removed" else method
            if key == "blocks_removed":
                by_blocks.plot([step[key] for step in steps], accuracy, marker="o", label=label)
            elif key == "activations_linearised":
                by_depth.plot([step["step"] if control else step["activations_linearised"] for step in steps],
                              accuracy, marker="o", linestyle="--" if control else "-",
                              label="control (x: steps of fine-tuning)" if control else method)
            if key == "sparsity":
                by_sparsity.plot([100 * step[key] for step in steps], accuracy, marker="o", label=method)
                for step, value in zip(steps, accuracy):
                    by_sparsity.annotate(str(step["activations_linearised"]), (100 * step[key], value), fontsize=7)
            ratios = timing.get(method, {}).get("onnxruntime", {})
            if ratios:
                by_latency.scatter([ratios.get(str(step["step"]), math.nan) for step in steps], accuracy,
                                   marker={"blocks_removed": "x", "sparsity": "s"}.get(key, "o"),
                                   label="control (unchanged model: the noise)" if control else label)
            kept = within_one_point(steps, key)
            row = timing.get(method, {})
            ort = f"{_ratio(ratios.get(str(kept['step'])))} / {_ratio(row.get('onnxruntime_224', {}).get('ratio'))}"
            inductor = f"{_ratio(row.get('inductor', {}).get('ratio'))} / " \
                       f"{_ratio(row.get('inductor_224', {}).get('ratio'))}"
            rows.append(f"| {name} | {label} | {100 * steps[0]['test']:.2f} | {kept['step']} | "
                        f"{kept['activations_linearised']} | {kept.get('blocks_removed', 0)} | "
                        f"{100 * kept.get('sparsity', 0):.1f} % | {kept['dense_weight_layers']} -> "
                        f"{kept['weight_layers']} | {100 * kept['test']:.2f} | {ort} | {inductor} |")
        exact = timing.get("exact passes only", {})
        rows.append(f"| {name} | exact passes only (BN folded) | | | 0 | 0 | | | | "
                    f"{_ratio(exact.get('onnxruntime_64'))} / {_ratio(exact.get('onnxruntime_224'))} | "
                    f"{_ratio(exact.get('inductor_64'))} / {_ratio(exact.get('inductor_224'))} |")
        by_depth.set(xlabel="activations linearised", ylabel="test accuracy (%)",
                     title=f"{name}, Fashion-MNIST {SIZE}px")
        by_latency.set(xlabel="batch-1 latency ratio, ONNX Runtime (compressed / dense)",
                       ylabel="test accuracy (%)", title=f"{name}: accuracy vs latency")
        by_blocks.set(xlabel="residual blocks removed (no fine-tuning after training)", ylabel="test accuracy (%)",
                      title=f"{name}: LaCoOT, with and without its regulariser")
        by_sparsity.set(xlabel="weight sparsity of the convs and linears (%)", ylabel="test accuracy (%)",
                        title=f"{name}: EGP vs global magnitude (labels: layers collapsed)")
        for axes in (by_depth, by_latency, by_blocks, by_sparsity):
            axes.grid(alpha=0.3)
            if axes.get_legend_handles_labels()[0]:
                axes.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(RESULTS / f"{name}.png", dpi=90)
    (RESULTS / "summary.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


def egp_split(name: str) -> None:
    """The fraction of each layer's weights that EGP's first round prunes on the dense model, with the calibration
    batches of the `egp` run (its step 1), and the layers pruned entirely."""
    from fxcompress.data import fashion_mnist_splits
    from fxcompress.trainable import apply_plan
    from fxcompress.finetune.loop import _calibration
    from fxcompress.finetune.methods import Egp, StepInputs
    from fxcompress.plan import Plan
    data = fashion_mnist_splits(SIZE, validation=DATA["validation"], train_samples=DATA["train_samples"],
                                test_samples=DATA["test_samples"], flip=True)
    example = (torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)),)
    calibration, _ = _calibration(data, 4, DATA["batch_size"])
    model = apply_plan(_dense(name), Plan(), example)
    prune_choice = Egp().choose(model, StepInputs(example, calibration, None, None), 1)[-1]
    pruned = {path: round(1 - mask.float().mean().item(), 4) for path, mask in prune_choice.masks.items()}
    result = {"model": name, "pruned_fraction": pruned, "pruned_entirely": [p for p, f in pruned.items() if f == 1]}
    (RESULTS / f"{name}_egp_round1.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["dense", "run", "latency", "report", "egp-split"])
    parser.add_argument("model", nargs="?", choices=list(DENSE))
    parser.add_argument("method", nargs="?", choices=list(METHODS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.command == "dense":
        dense(args.model)
    elif args.command == "run":
        run(args.model, args.method)
    elif args.command == "latency":
        latency(args.model)
    elif args.command == "report":
        report()
    elif args.command == "egp-split":
        egp_split(args.model)


if __name__ == "__main__":
    main()
