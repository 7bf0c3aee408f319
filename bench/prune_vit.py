"""Shallower vision transformers on Fashion-MNIST: the loop's methods on the small ViTs of `fashion_vit.py`.

  python bench/prune_vit.py run ARCH METHOD     one method's loop (ARCH: torchvision, timm; METHOD: see RUNS_OF)
  python bench/prune_vit.py latency ARCH        latency ratios against the dense model: every step of EVERY_STEP's
                                                runs at batch 1 on ONNX Runtime; each run's step within 1 point
                                                (LaCoOT: its first removal) at batch 1 and 32 on ONNX Runtime and
                                                Inductor, alone and with FOLDER token merging
  python bench/prune_vit.py report              plots (PNG) and the summary tables (Markdown) of all runs

Every run starts from the trained ViT (`train_fashion_vit.py`, one epoch) and trains it DENSE_EPOCHS more on the
fine-tuning split before step 0 (so that the steps' fine-tuning is not mostly catching up); `control` fine-tunes
as long without changing the model: the gain of training alone. EASIER and TLC linearise one GELU per step (a
linearised MLP collapses into one d x d linear), then fine-tune one epoch; LaCoOT trains DENSE_EPOCHS with its
block-distance penalty (weight LACOOT_WEIGHT; 0 is the baseline), then removes one encoder layer (attention and
MLP) per step, smallest distance first, without fine-tuning. Runs are resumable (bench/runs/vit/, not committed);
results go to bench/results/vit/. A compressed model's latency depends on its plan, not its weights, so latency is
measured on the dense model compressed with each step's plan.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashion_vit  # noqa: E402
from fxcompress import Task  # noqa: E402
import trajectories  # noqa: E402
from trajectories import lacoot_weight, read_trajectory, within_one_point  # noqa: E402

from fxcompress.finetune.run_folder import plan_until  # noqa: E402

ROOT = Path(__file__).resolve().parent
RUNS = ROOT / "runs" / "vit"
RESULTS = ROOT / "results" / "vit"
ARCHS = ("torchvision", "timm")
LAYERS, GELUS = 6, 6
DATA = {"validation": 2000, "train_samples": 20000, "batch_size": 64}
TRAIN = {"optimizer": "adamw", "lr": 3e-4, "weight_decay": 0.05}
DENSE_EPOCHS = 2
LACOOT_WEIGHT = 1.0  # the penalty starts about as large as the cross-entropy (layer distances ~1.3, CE ~0.7)
MAX_DROP_CURVE = 0.03  # EASIER and TLC go on past 1 point so that the curves show where accuracy falls
RUNS_OF = {
    "easier": {"method": "easier", "steps": GELUS},
    "tlc": {"method": "tlc", "steps": GELUS},
    "control": {"method": "control", "steps": GELUS},
    "lacoot": {"method": "lacoot", "steps": LAYERS, "epochs_per_step": 0, "max_drop": 1.0},
    "lacoot-0": {"method": "lacoot", "steps": LAYERS, "epochs_per_step": 0, "max_drop": 1.0, "lacoot_weight": 0.0},
}
EVERY_STEP = ("easier", "lacoot")  # runs whose every step is timed (batch 1, ONNX Runtime): the plots
TOKENS = {"method": "folder", "layers": [1], "ratio": 0.66, "proportional_attention": True}  # tokens.md's folder@1


def splits() -> SimpleNamespace:
    """Validation: the first DATA["validation"] training images; fine-tuning: the next train_samples; test: 10k."""
    x, y = fashion_vit.images("train")
    start, end = DATA["validation"], DATA["validation"] + DATA["train_samples"]
    test_x, test_y = fashion_vit.images("test")
    return SimpleNamespace(train=TensorDataset(x[start:end], y[start:end]),
                           validation=TensorDataset(x[:start], y[:start]), test=TensorDataset(test_x, test_y))


def example(batch: int = DATA["batch_size"]) -> tuple:
    """The torchvision ViT fixes its batch when captured: the loop's example has the calibration batch size."""
    return (fashion_vit.images("test")[0][:batch],)


def torchvision_vit() -> torch.nn.Module:
    """`fxcompress prune bench.prune_vit:torchvision_vit --data bench.prune_vit:task` runs the loop on the CLI."""
    return fashion_vit.load("torchvision")


def timm_vit() -> torch.nn.Module:
    return fashion_vit.load("timm")


def task() -> Task:
    """The splits and example inputs, for the CLI's --data."""
    data = splits()
    return Task(data.train, data.validation, data.test, example())


def run(arch: str, method: str) -> None:
    from fxcompress import prune
    from fxcompress.finetune.trainer import TrainConfig
    settings = dict(RUNS_OF[method])
    options = {"max_drop": MAX_DROP_CURVE, "dense_epochs": DENSE_EPOCHS, "per_step": 1, **settings}
    if options["method"] == "lacoot":
        options["method_options"] = {"weight": options.pop("lacoot_weight", LACOOT_WEIGHT)}
    folder = RUNS / arch / method
    result = prune(fashion_vit.load(arch), example(), data=splits(), out=folder,
                   resume=(folder / "checkpoint.pt").is_file(),
                   train_config=TrainConfig(batch_size=DATA["batch_size"], progress=False, **TRAIN), **options)
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(folder / "trajectory.json", RESULTS / f"{arch}_{method}.json")
    (RESULTS / f"{arch}_{method}_plan.json").write_text(json.dumps(result.plan.to_dict(), indent=2))


def trajectory(arch: str, method: str) -> dict | None:
    return read_trajectory(RESULTS / f"{arch}_{method}.json")


def progress_key(method: str) -> str:
    return "blocks_removed" if RUNS_OF[method]["method"] == "lacoot" else "activations_linearised"


def latency_ratio(model, plan, batch: int, lowering: str, tokens: dict | None = None) -> float:
    return trajectories.latency_ratio(model, plan, example(batch), lowering, tokens)


def measured_step(method: str, steps: list[dict]) -> int:
    """The step whose latency and token combination are measured: the last within 1 point; for LaCoOT, whose
    steps do not fine-tune, at least the first removal (the table gives its accuracy)."""
    kept = within_one_point(steps, progress_key(method))["step"]
    return max(kept, 1) if RUNS_OF[method]["method"] == "lacoot" and len(steps) > 1 else kept


def test_accuracy(arch: str, method: str, steps: list[dict], step: int, tokens: dict | None) -> float:
    """The test accuracy of a run's step, with FOLDER token merging if asked: the kept step's weights, or, in a
    run that does not fine-tune after step 0 (LaCoOT), the run's weights with the step's plan."""
    from fxcompress import compress
    from fxcompress.finetune.run_folder import RunFolder
    from fxcompress.trainable import apply_plan, base_of
    folder = RunFolder(RUNS / arch / method)
    kept_step = folder.trajectory()["kept"]
    if kept_step != step and RUNS_OF[method].get("epochs_per_step", 1) != 0:
        raise SystemExit(f"{arch}/{method}: kept.pt holds step {kept_step}, not {step}")
    planned = apply_plan(base_of(folder.kept_model()).eval(), plan_until(steps, step), example())
    compressed = compress(planned, example(), tokens=tokens).module
    return fashion_vit.accuracy(compressed, *fashion_vit.images("test"))


def latency(arch: str) -> None:
    from fxcompress import compress
    path = RESULTS / f"{arch}_latency.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    model = fashion_vit.load(arch)

    def record(entry: dict, key: str, compute) -> None:
        if key not in entry:
            entry[key] = compute()
            path.write_text(json.dumps(results, indent=2))

    dense = results.setdefault("dense", {})
    for batch in (1, 32):
        for lowering in ("onnxruntime", "inductor"):
            record(dense, f"{lowering}_b{batch}", lambda: latency_ratio(model, None, batch, lowering))
            record(dense, f"{lowering}_b{batch}_tokens", lambda: latency_ratio(model, None, batch, lowering, TOKENS))
    record(dense, "test", lambda: fashion_vit.accuracy(model, *fashion_vit.images("test")))
    record(dense, "test_tokens", lambda: fashion_vit.accuracy(
        compress(model, example(), tokens=TOKENS).module, *fashion_vit.images("test")))
    for method in RUNS_OF:
        steps = (trajectory(arch, method) or {}).get("steps")
        if not steps:
            continue
        entry = results.setdefault(method, {"onnxruntime_b1": {}})
        for step in steps if method in EVERY_STEP else ():
            record(entry["onnxruntime_b1"], str(step["step"]),
                   lambda: latency_ratio(model, plan_until(steps, step["step"]), 1, "onnxruntime"))
        if method == "control":
            continue
        kept = measured_step(method, steps)
        if entry.get("kept", {}).get("step") != kept:
            entry["kept"] = {"step": kept}
        plan = plan_until(steps, kept)
        for batch in (1, 32):
            for lowering in ("onnxruntime", "inductor"):
                record(entry["kept"], f"{lowering}_b{batch}", lambda: latency_ratio(model, plan, batch, lowering))
                record(entry["kept"], f"{lowering}_b{batch}_tokens",
                       lambda: latency_ratio(model, plan, batch, lowering, TOKENS))
        record(entry["kept"], "test_tokens", lambda: test_accuracy(arch, method, steps, kept, TOKENS))
        print(arch, method, entry["kept"], flush=True)


def _ratio(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def report() -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = ["| ViT | method | step-0 test | kept step | GELUs linearised | layers removed | weight layers | "
            "MACs ratio | "
            "test | Δ test (pt) |", "|---|---|---|---|---|---|---|---|---|---|"]
    combined = ["| ViT | model | test | ORT b1 | ORT b32 | Inductor b1 | Inductor b32 |",
                "|---|---|---|---|---|---|---|"]
    figure, axes = plt.subplots(len(ARCHS), 3, figsize=(15, 4.5 * len(ARCHS)), squeeze=False)
    for row, arch in enumerate(ARCHS):
        path = RESULTS / f"{arch}_latency.json"
        timing = json.loads(path.read_text()) if path.is_file() else {}
        by_gelus, by_layers, by_latency = axes[row]
        for method in RUNS_OF:
            data = trajectory(arch, method)
            if data is None:
                continue
            steps, key = data["steps"], progress_key(method)
            accuracy = [100 * step["test"] for step in steps]
            label = f"{method} (lambda {lacoot_weight(data['settings']):g})" if key == "blocks_removed" else method
            if method == "control":
                by_gelus.plot([s["step"] for s in steps], accuracy, linestyle="--", marker="o",
                              label="control (x: steps of fine-tuning)")
            else:
                (by_layers if key == "blocks_removed" else by_gelus).plot([s[key] for s in steps], accuracy,
                                                                          marker="o", label=label)
            ratios = timing.get(method, {}).get("onnxruntime_b1", {})
            if ratios and method != "control":
                by_latency.scatter([ratios.get(str(s["step"]), math.nan) for s in steps], accuracy, label=label,
                                   marker="x" if key == "blocks_removed" else "o")
            kept = within_one_point(steps, key)
            runs.append(f"| {arch} | {label} | {100 * steps[0]['test']:.2f} | {kept['step']} | "
                        f"{kept['activations_linearised']} | {kept['blocks_removed']} | "
                        f"{kept['dense_weight_layers']} -> {kept['weight_layers']} | {kept['macs_ratio']:.3f} | "
                        f"{100 * kept['test']:.2f} | {100 * (kept['test'] - steps[0]['test']):+.2f} |")
            measured = timing.get(method, {}).get("kept", {})
            if measured and method != "control":
                step = steps[measured["step"]]
                removed = "layers removed" if key == "blocks_removed" else "GELUs linearised"
                what = f"{label}, step {step['step']} ({step[key]} {removed})"
                combined.append(_latency_row(arch, what, step["test"], measured, ""))
                combined.append(_latency_row(arch, f"{what} + FOLDER", measured.get("test_tokens"), measured,
                                             "_tokens"))
        dense = timing.get("dense", {})
        if dense:
            combined.append(_latency_row(arch, "original (1 epoch), exact passes", dense.get("test"), dense, ""))
            combined.append(_latency_row(arch, "original + FOLDER", dense.get("test_tokens"), dense, "_tokens"))
        by_gelus.set(xlabel="GELUs linearised (MLP collapsed)", ylabel="test accuracy (%)",
                     title=f"{arch} ViT, Fashion-MNIST: EASIER, TLC")
        by_layers.set(xlabel="encoder layers removed (no fine-tuning)", ylabel="test accuracy (%)",
                      title=f"{arch} ViT: LaCoOT with and without its penalty")
        by_latency.set(xlabel="batch-1 latency ratio, ONNX Runtime (compressed / dense)", ylabel="test accuracy (%)",
                       title=f"{arch} ViT: accuracy vs latency")
        for axis in (by_gelus, by_layers, by_latency):
            axis.grid(alpha=0.3)
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(RESULTS / "vit.png", dpi=90)
    text = "\n".join(runs) + "\n\nLatency ratios against the dense model (1 thread, medians of 30):\n\n" + \
        "\n".join(combined) + "\n"
    (RESULTS / "summary.md").write_text(text)
    print(text)


def _latency_row(arch: str, name: str, test: float | None, ratios: dict, suffix: str) -> str:
    return f"| {arch} | {name} | {_percent(test)} | " + " | ".join(
        _ratio(ratios.get(f"{lowering}_b{batch}{suffix}")) for lowering in ("onnxruntime", "inductor")
        for batch in (1, 32)) + " |"


def _percent(value) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "latency", "report"])
    parser.add_argument("arch", nargs="?", choices=ARCHS)
    parser.add_argument("method", nargs="?", choices=list(RUNS_OF))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.command == "run":
        run(args.arch, args.method)
    elif args.command == "latency":
        latency(args.arch)
    else:
        report()


if __name__ == "__main__":
    main()
