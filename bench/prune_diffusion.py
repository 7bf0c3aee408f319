"""Shallower diffusion denoisers on Fashion-MNIST: LaCoOT and EASIER on the UNet and DiT of `fashion_diffusion.py`.

  python bench/prune_diffusion.py run KIND METHOD   one method's loop (KIND: unet, dit; METHOD: see RUNS_OF)
  python bench/prune_diffusion.py quality KIND      per step of each run: Fréchet distance (classifier features)
                                                    and classifier accuracy of class-conditional samples, sampling
                                                    time ratio, and a grid of every step from the same noise
  python bench/prune_diffusion.py report            plots (PNG) and the summary table (Markdown)

The loop trains and scores the denoiser with the DDPM objective (`fxcompress.finetune.objectives.Denoising`:
epsilon MSE at uniform timesteps; the score is minus that error on the validation split, with fixed draws).
LaCoOT fine-tunes the trained denoiser DENSE_EPOCHS on FINETUNE_SAMPLES images with its block-distance penalty
(weight LACOOT_WEIGHT; `lacoot-0.05` at the denoising loss's scale; `lacoot-0` without it, the baseline), then
removes one residual block per step (a UNet resnet or attention block with an identity shortcut, a whole DiT
block), smallest distance first, without fine-tuning, to the last block. EASIER linearises one GELU of the DiT's
MLPs per step (`only`: not the SiLUs of its conditioning MLPs; the MLP then collapses into one linear) and
fine-tunes one epoch. Every step's weights are kept (`save_steps`), so `quality` samples each step. Sampling:
DDIM, SAMPLE_STEPS steps, eager, the same seeds for every model. Runs are resumable (bench/runs/diffusion/, not
committed); results go to bench/results/diffusion/.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import diffusion_quality  # noqa: E402
import fashion_diffusion  # noqa: E402
from fxcompress import Task  # noqa: E402
from trajectories import lacoot_weight, read_trajectory  # noqa: E402

ROOT = Path(__file__).resolve().parent
RUNS = ROOT / "runs" / "diffusion"
RESULTS = ROOT / "results" / "diffusion"
KINDS = ("unet", "dit")
DATA = {"validation": 1000, "finetune_samples": 6000, "test": 1000, "batch_size": 64}
TRAIN = {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.0}
DENSE_EPOCHS = 1
LACOOT_WEIGHT = 1.0  # as on the ViTs: here it outweighs the denoising loss (see lacoot-0.05)
SAMPLE_STEPS = 25
QUALITY_COUNT = 250  # one batch of SAMPLE_BATCH: the compressed UNet has a fixed batch
RUNS_OF = {
    "lacoot": {"method": "lacoot", "epochs_per_step": 0, "max_drop": 1.0},
    "lacoot-0": {"method": "lacoot", "epochs_per_step": 0, "max_drop": 1.0, "lacoot_weight": 0.0},
    # the penalty at the scale of the denoising loss (MSE ~0.04; block distances ~0.4-1.5)
    "lacoot-0.05": {"method": "lacoot", "epochs_per_step": 0, "max_drop": 1.0, "lacoot_weight": 0.05},
    "easier": {"method": "easier", "epochs_per_step": 1, "max_drop": 1.0, "steps": 6, "only": r"\.ff\.",
               "kinds": ("dit",)},  # the blocks' MLP GELUs, not the conditioning SiLUs (tiny, per sample)
}


def splits() -> SimpleNamespace:
    """Validation: the first DATA["validation"] training images; fine-tuning: the next finetune_samples; test: the
    first DATA["test"] test images."""
    x, y = fashion_diffusion.images("train")
    start, end = DATA["validation"], DATA["validation"] + DATA["finetune_samples"]
    test_x, test_y = fashion_diffusion.images("test")
    return SimpleNamespace(train=TensorDataset(x[start:end], y[start:end]),
                           validation=TensorDataset(x[:start], y[:start]),
                           test=TensorDataset(test_x[:DATA["test"]], test_y[:DATA["test"]]))


def objective():
    from fxcompress.finetune.objectives import Denoising
    return Denoising(fashion_diffusion.scheduler().alphas_cumprod)


def unet() -> torch.nn.Module:
    """`fxcompress prune bench.prune_diffusion:unet --data bench.prune_diffusion:task` runs the loop on the CLI."""
    return fashion_diffusion.load("unet")


def dit() -> torch.nn.Module:
    return fashion_diffusion.load("dit")


def task() -> Task:
    """The splits, example inputs and denoising objective, for the CLI's --data."""
    data = splits()
    return Task(data.train, data.validation, data.test, fashion_diffusion.example_inputs(DATA["batch_size"]),
                objective())


def run(kind: str, method: str) -> None:
    from fxcompress import prune
    from fxcompress.finetune.trainer import TrainConfig
    settings = {key: value for key, value in RUNS_OF[method].items() if key != "kinds"}
    if kind not in RUNS_OF[method].get("kinds", KINDS):
        raise SystemExit(f"{method} is run on {', '.join(RUNS_OF[method]['kinds'])} only")
    options = {"dense_epochs": DENSE_EPOCHS, "per_step": 1, "save_steps": True, **settings}
    if options["method"] == "lacoot":
        options["method_options"] = {"weight": options.pop("lacoot_weight", LACOOT_WEIGHT)}
    folder = RUNS / kind / method
    data = task()
    prune(fashion_diffusion.load(kind), data.example, data=data, objective=data.objective, out=folder,
          resume=(folder / "checkpoint.pt").is_file(),
          train_config=TrainConfig(batch_size=DATA["batch_size"], progress=False, **TRAIN), **options)
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(folder / "trajectory.json", RESULTS / f"{kind}_{method}.json")


def trajectory(kind: str, method: str) -> dict | None:
    return read_trajectory(RESULTS / f"{kind}_{method}.json")


SAMPLE_BATCH, TIME_BATCH = 250, 10  # sampling for the quality scores; timing and grids


def step_model(kind: str, method: str, step: int, batch: int):
    """A run's step: its trained weights with its plan, compressed (what a deployment samples with) for batches
    of `batch` (diffusers' UNet fixes its batch when captured)."""
    from fxcompress import compress
    from fxcompress.finetune.run_folder import RunFolder
    planned = RunFolder(RUNS / kind / method).step_model(step)
    return compress(planned.eval(), fashion_diffusion.example_inputs(batch), dynamic_batch=False).module


def time_ratio(dense, model, repeats: int = 3, batch: int = 10) -> tuple[float, float]:
    """(seconds per image of `model`, its ratio to `dense`'s): sampling `batch` images, the two timed in turn,
    medians of `repeats`."""
    times = {"dense": [], "model": []}
    for _ in range(repeats):
        for name, denoiser in (("dense", dense), ("model", model)):
            times[name].append(diffusion_quality.seconds_per_image(denoiser, SAMPLE_STEPS, batch, repeats=1))
    dense_time, model_time = (statistics.median(times[name]) for name in ("dense", "model"))
    return model_time, model_time / dense_time


def quality(kind: str) -> None:
    path = RESULTS / f"{kind}_quality_steps.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for method in RUNS_OF:
        steps = (trajectory(kind, method) or {}).get("steps")
        if not steps:
            continue
        entry = results.setdefault(method, {})
        dense = step_model(kind, method, 0, TIME_BATCH)
        grids = []
        for step in steps:
            model = dense if step["step"] == 0 else step_model(kind, method, step["step"], TIME_BATCH)
            key = str(step["step"])
            if key not in entry:
                seconds, ratio = time_ratio(dense, model, batch=TIME_BATCH)
                sampler = step_model(kind, method, step["step"], SAMPLE_BATCH)
                entry[key] = {**diffusion_quality.quality(sampler, QUALITY_COUNT, SAMPLE_STEPS, seed=0),
                              "seconds_per_image": round(seconds, 4), "time_ratio": round(ratio, 4)}
                path.write_text(json.dumps(results, indent=2))
                print(kind, method, key, entry[key], flush=True)
            grids.append(fashion_diffusion.sample(model, torch.arange(10), SAMPLE_STEPS, seed=1))
        diffusion_quality.grid(torch.cat(grids), RESULTS / f"{kind}_{method}_steps.png", per_row=10)


def report() -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = ["| denoiser | method | step | blocks removed | GELUs linearised | weight layers | MACs ratio | "
            "test denoising MSE | Fréchet distance | classifier accuracy | sampling time ratio |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    figure, axes = plt.subplots(len(KINDS), 2, figsize=(11, 4.5 * len(KINDS)), squeeze=False)
    for row, kind in enumerate(KINDS):
        path = RESULTS / f"{kind}_quality_steps.json"
        measured = json.loads(path.read_text()) if path.is_file() else {}
        by_depth, by_time = axes[row]
        for method in RUNS_OF:
            data = trajectory(kind, method)
            if data is None:
                continue
            key = "blocks_removed" if RUNS_OF[method]["method"] == "lacoot" else "activations_linearised"
            label = f"{method} (lambda {lacoot_weight(data['settings']):g})" if key == "blocks_removed" else method
            points = [(step, measured.get(method, {}).get(str(step["step"]))) for step in data["steps"]]
            points = [(step, values) for step, values in points if values]
            if not points:
                continue
            by_depth.plot([step[key] for step, _ in points], [values["frechet_distance"] for _, values in points],
                          marker="o", label=label)
            by_time.plot([values["time_ratio"] for _, values in points],
                         [values["frechet_distance"] for _, values in points], marker="o", label=label)
            for step, values in points:
                rows.append(f"| {kind} | {label} | {step['step']} | {step['blocks_removed']} | "
                            f"{step['activations_linearised']} | {step['weight_layers']} | {step['macs_ratio']:.3f} | "
                            f"{-step['test']:.4f} | {values['frechet_distance']:.2f} | "
                            f"{100 * values['classifier_accuracy']:.1f} % | {values['time_ratio']:.3f} |")
        by_depth.set(xlabel="blocks removed (LaCoOT) / GELUs linearised (EASIER)",
                     ylabel="Fréchet distance, classifier features", title=f"{kind}: depth vs sample quality")
        by_time.set(xlabel="sampling time ratio (compressed / dense, eager)",
                    ylabel="Fréchet distance, classifier features", title=f"{kind}: speed vs sample quality")
        for axis in (by_depth, by_time):
            axis.grid(alpha=0.3)
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(RESULTS / "prune_diffusion.png", dpi=90)
    (RESULTS / "prune_summary.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "quality", "report"])
    parser.add_argument("kind", nargs="?", choices=KINDS)
    parser.add_argument("method", nargs="?", choices=list(RUNS_OF))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.command == "run":
        run(args.kind, args.method)
    elif args.command == "quality":
        quality(args.kind)
    else:
        report()


if __name__ == "__main__":
    main()
