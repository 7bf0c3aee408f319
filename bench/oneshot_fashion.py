"""Shallower and faster at equal accuracy, by one protocol: the one-shot selection against a control trained as long.

  python bench/oneshot_fashion.py run NAME      one run (RUNS) through `fxcompress prune`; resumable
  python bench/oneshot_fashion.py latency       whole-model latency of each run's final plan, on the dense model,
                                                ONNX Runtime batch 1 at 64 and 224 (1 and 2 threads), interleaved
  python bench/oneshot_fashion.py report        results table (Markdown), plot (test accuracy vs latency ratio)
  python bench/oneshot_fashion.py freeze        commit the demo's models: the one-shot run's final model, the
                                                control, fp16 weights and plan, in DEMO_FILE
  python bench/oneshot_fashion.py demo          the main job: the committed shallower MobileNetV2 against the
                                                control on the 10k test images, and its latency ratio

The protocol. Every run starts from the same dense MobileNetV2 (ImageNet weights fine-tuned on Fashion-MNIST at
64x64: `DENSE_FILE`, 90.12 % on 5k test images) and trains the same total: `EPOCHS` epochs of the 55k training
images (the 5k validation images are carved out of the 60k train split; the test set is all 10k), with the same
recipe (SGD, lr 0.01, cosine, batch 64, distillation from the dense start with weight 0.7 at T 4). What differs
is what is removed:
- control: nothing (the dense model trained as long: the reference every drop is measured against);
- oneshot-probe / oneshot-criterion / oneshot-random: the one-shot selection reaching TARGET of the dense
  latency (ONNX Runtime, batch 1, 1 thread) with probe, criterion or random importance, then one fine-tune with
  the selected decisions annealed in over the first ANNEAL of it; oneshot-probe-0.60 and oneshot-random-0.60 ask
  0.60 instead, a margin for the table's optimism (their probes and latency table are oneshot-probe's, seeded);
- iterative: EASIER with the latency-aware selection, 2 activations per step, 6 steps of half the training
  images each (the same total), as the loop did before the one-shot selection.
The probes' throwaway fine-tunes (16 batches per candidate) are not counted in the total; they are reported.
Runs live in bench/runs/oneshot/ (not committed); trajectories, plans, selections and tables go to
bench/results/oneshot/.
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
from trajectories import latency_ratio, read_trajectory  # noqa: E402

ROOT = Path(__file__).resolve().parent
RUNS = ROOT / "runs" / "oneshot"
RESULTS = ROOT / "results" / "oneshot"
DENSE_FILE = ROOT / "results" / "prune" / "mobilenet_v2_dense_start.pt"
DEMO_FILE = RESULTS / "mobilenet_v2_demo.pt"
SIZE, VALIDATION, EPOCHS, TARGET, ANNEAL = 64, 5000, 3, 0.67, 0.3
COLLAPSE = "every inverted residual collapsed"  # a latency reference (merges alone), not a run
RECIPE = ["--lr", "0.01", "--schedule", "cosine", "--batch-size", "64", "--distill", "0.7", "--temperature", "4"]


def oneshot(importance: str, target: float = TARGET) -> list[str]:
    return ["--method", "oneshot", "--latency-ratio", str(target), "--anneal", str(ANNEAL), "--steps", "1",
            "--epochs-per-step", str(EPOCHS), "--importance", importance]


RUNS_OF = {
    "oneshot-probe": oneshot("probe"),
    "oneshot-probe-0.60": oneshot("probe", 0.60),  # a margin: the table's predictions run ~0.07 optimistic
    "control": ["--method", "control", "--steps", "1", "--epochs-per-step", str(EPOCHS)],
    "oneshot-random": oneshot("random"),
    "oneshot-random-0.60": oneshot("random", 0.60),
    "oneshot-criterion": oneshot("criterion"),
    "iterative": ["--method", "easier", "--selection", "latency", "--per-step", "2", "--steps", str(2 * EPOCHS),
                  "--epochs-per-step", "1", "--train-samples", str((60000 - VALIDATION) // 2)],
}


def mobilenet_v2() -> torch.nn.Module:
    """The dense start (the CLI's MODEL: `bench.oneshot_fashion:mobilenet_v2`)."""
    from prune_fashion import base_model
    model = base_model("mobilenet_v2")
    model.load_state_dict({key: value.float() for key, value in torch.load(DENSE_FILE, weights_only=True).items()})
    return model.eval()


def run(name: str) -> None:
    folder = RUNS / name
    probes = RESULTS / f"{name}_probes.json"
    if probes.is_file() and not (folder / "probes.json").is_file():  # committed probes: not probed again
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(probes, folder / "probes.json")
    command = [sys.executable, "-m", "fxcompress.cli", "prune", "bench.oneshot_fashion:mobilenet_v2",
               "--size", str(SIZE), "--validation-samples", str(VALIDATION), "--max-drop", "1.0", "--latency",
               "--lowering", "onnxruntime", "--latency-threads", "1", "--out", str(folder), *RECIPE, *RUNS_OF[name]]
    if (folder / "checkpoint.pt").is_file():
        command.append("--resume")
    elif folder.is_dir() and any(folder.iterdir()):
        command.append("--force")  # the probes alone: --force keeps them (it deletes a run's own files)
    subprocess.run(command, check=True, cwd=ROOT.parent, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    RESULTS.mkdir(parents=True, exist_ok=True)
    for source in ("trajectory.json", "plan.json", "selection.json", "probes.json"):
        if (folder / source).is_file():
            shutil.copy(folder / source, RESULTS / f"{name}_{source}")


def collapse_plan(model, example):
    """Both activations of every inverted residual linearised (blocks 2-17): each collapses into one dense conv,
    its shortcut a Dirac tap. The ceiling of merges alone (its accuracy is not measured: untrained, it is lost)."""
    from fxcompress import Plan, activation_names
    return Plan.linearize([name for name in activation_names(model, example)
                           if ".conv." in name and not name.startswith("features.1.")])


def trajectory(name: str) -> dict | None:
    return read_trajectory(RESULTS / f"{name}_trajectory.json")


def final_plan(name: str):
    from fxcompress import Plan
    return Plan.load(RESULTS / f"{name}_plan.json")


def latency() -> None:
    path = RESULTS / "latency.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    model = mobilenet_v2()
    plans = {name: final_plan for name in RUNS_OF if trajectory(name) is not None}
    plans[COLLAPSE] = lambda _: collapse_plan(model, (torch.randn(1, 3, SIZE, SIZE),))
    for name, plan_of_run in plans.items():
        if name in results:
            continue
        plan = plan_of_run(name)
        entry = {}
        for size in (SIZE, 224):
            for threads in (1, 2):
                torch.set_num_threads(threads)
                example = (torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)),)
                entry[f"onnxruntime_{size}_threads{threads}"] = latency_ratio(model, plan, example, "onnxruntime",
                                                                              repeats=50)
        results[name] = entry
        path.write_text(json.dumps(results, indent=2))
        print(name, entry, flush=True)


def pair(ratios: dict, size: int) -> str:
    """The ONNX Runtime speed-ups at `size` on 1 and 2 threads, in words."""
    from fxcompress.measure import speedup
    values = [ratios.get(f"onnxruntime_{size}_threads{threads}") for threads in (1, 2)]
    return " / ".join("—" if value is None else speedup(value) for value in values)


def report() -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    timing = json.loads((RESULTS / "latency.json").read_text()) if (RESULTS / "latency.json").is_file() else {}
    control = trajectory("control")
    reference = control["steps"][-1]["test"] if control else math.nan
    rows = ["| run | test % | vs control (pt) | vs dense start (pt) | weight layers | activations linearised | "
            "blocks removed | MACs ratio | ORT batch 1, 64², 1 / 2 threads | ORT 224², 1 / 2 threads | "
            "predicted (table) | seconds |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    figure, axes = plt.subplots(figsize=(7, 5))
    for name in RUNS_OF:
        data = trajectory(name)
        if data is None:
            continue
        first, last = data["steps"][0], data["steps"][-1]
        ratios = timing.get(name, {})
        selection = RESULTS / f"{name}_selection.json"
        predicted = json.loads(selection.read_text())["selection"]["predicted_ratio"] if selection.is_file() else None
        seconds = sum(step["seconds"] for step in data["steps"])

        rows.append(f"| {name} | {100 * last['test']:.2f} | {100 * (last['test'] - reference):+.2f} | "
                    f"{100 * (last['test'] - first['test']):+.2f} | {last['dense_weight_layers']} → "
                    f"{last['weight_layers']} | {last['activations_linearised']} | {last['blocks_removed']} | "
                    f"{last['macs_ratio']:.3f} | {pair(ratios, SIZE)} | {pair(ratios, 224)} | "
                    f"{'—' if predicted is None else f'{predicted:.3f}'} | {seconds:.0f} |")
        ratio = ratios.get(f"onnxruntime_{SIZE}_threads1")
        if ratio is not None:
            axes.scatter([1 / ratio], [100 * last["test"]], label=name, marker="s" if name == "control" else "o")
    if COLLAPSE in timing:
        from fxcompress import compress
        model, example = mobilenet_v2(), (torch.randn(1, 3, SIZE, SIZE),)
        plan = collapse_plan(model, example)
        collapsed = compress(model, example, plan=plan).report
        rows.append(f"| {COLLAPSE} (untrained: latency only) | — | — | — | {collapsed.before.weight_layers} → "
                    f"{collapsed.after.weight_layers} | {len(plan.targets('linearize'))} | 0 | — | "
                    f"{pair(timing[COLLAPSE], SIZE)} | {pair(timing[COLLAPSE], 224)} | — | — |")
    axes.axhline(100 * reference - 1, color="grey", linestyle="--", label="control - 1 point")
    axes.axvline(1.5, color="grey", linestyle=":", label="goal: 1.5x")
    axes.set(xlabel=f"speed-up, ONNX Runtime batch 1, {SIZE}², 1 thread (dense / compressed)",
             ylabel="test accuracy, 10k images (%)", title="MobileNetV2 on Fashion-MNIST, same total training")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(RESULTS / "oneshot.png", dpi=90)
    (RESULTS / "summary.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


DEMO_RUN = "oneshot-probe-0.60"


def freeze() -> None:
    from fxcompress.finetune.run_folder import RunFolder
    half = lambda state: {key: value.half() if value.is_floating_point() else value for key, value in state.items()}
    saved = {"run": DEMO_RUN}
    for label, name in (("shallower", DEMO_RUN), ("control", "control")):
        folder = RunFolder(RUNS / name)
        state, kept = folder.checkpoint(), folder.trajectory()["kept"]
        if state["trajectory"]["steps"][-1]["step"] != kept:
            raise SystemExit(f"{name}: its last step is not its kept step {kept}")
        saved[label] = {"plan": state["plan"], "state_dict": half(state["state_dict"]), "step": kept}
    torch.save(saved, DEMO_FILE)
    print(f"wrote {DEMO_FILE}")


def demo() -> None:
    from fxcompress import Plan, compress
    from fxcompress.data import fashion_mnist_splits
    from fxcompress.trainable import apply_plan
    from fxcompress.finetune.trainer import evaluate
    from fxcompress.measure import measure, speedup
    saved = torch.load(DEMO_FILE, map_location="cpu", weights_only=False)
    example = (torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)),)
    dense = mobilenet_v2()
    models = {}
    for label in ("control", "shallower"):
        model = mobilenet_v2()
        model.load_state_dict({key: value.float() for key, value in saved[label]["state_dict"].items()})
        models[label] = apply_plan(model.eval(), Plan.from_dict(saved[label]["plan"]), example)
    test = fashion_mnist_splits(SIZE, validation=VALIDATION).test
    print(f"MobileNetV2 (ImageNet weights) on Fashion-MNIST at {SIZE}px: the one-shot selection ({saved['run']} of "
          f"bench/oneshot_fashion.py) against the control trained as long (nothing removed); weights and plans "
          f"committed in {DEMO_FILE.relative_to(ROOT.parent)}\n")
    print(f"{'':10} {'activations':>11} {'weight layers':>14} {'MACs':>8} {'test accuracy (10k)':>20}")
    compressed = {}
    for label, model in models.items():
        result = compress(model, example)
        compressed[label] = result.module
        after = result.report.after
        print(f"{label:10} {after.activations:>11} {after.weight_layers:>14} {after.macs / 1e6:>7.1f}M "
              f"{100 * evaluate(model, test).accuracy:>19.2f}%")
    plan = Plan.from_dict(saved["shallower"]["plan"])
    print(f"\nplan: {len(plan.targets('linearize'))} activations linearised, {len(plan.targets('remove_block'))} "
          f"blocks removed, {len(plan.targets('remove_channels'))} channel groups pruned")
    torch.set_num_threads(1)
    timing = measure({"dense": dense, "shallower": compressed["shallower"]}, example, lowering="onnxruntime",
                     repeats=50)
    ratio = timing["results"]["shallower"]["ratio"]
    print(f"batch-1 latency on ONNX Runtime at {SIZE}x{SIZE}, 1 thread (shallower / dense = {ratio:.3f}): "
          f"{speedup(ratio)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "latency", "report", "freeze", "demo"])
    parser.add_argument("name", nargs="?", choices=list(RUNS_OF))
    args = parser.parse_args()
    if args.command == "run":
        run(args.name)
    else:
        torch.set_num_threads(1)
        {"latency": latency, "report": report, "freeze": freeze, "demo": demo}[args.command]()


if __name__ == "__main__":
    main()
