"""How good the samples of a Fashion-MNIST denoiser are, measured in the feature space of `fashion_classifier.py`.

`quality` draws class-conditional samples (labels balanced over the 10 classes) and gives the Fréchet distance
between Gaussians fitted to their classifier features and to those of as many real test images (not an FID: the
features are a small Fashion-MNIST classifier's, not Inception's), and the classifier's accuracy on the samples
(the fraction classified as the class they were drawn for). `grid` saves images as a PNG grid. `report` writes
bench/results/diffusion/{kind}_quality.json (these numbers, the real train vs test distance as the floor, and the
sampling time per image) and {kind}_grid.png (one row per class).

    .venv/bin/python bench/diffusion_quality.py report {unet,dit} [--count 500] [--steps 50]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torchvision.utils

import fashion_classifier
from fashion_diffusion import CLASSES, KINDS, RESULTS, SAMPLE_STEPS, load, sample
from fashion_diffusion import images as fashion_images
from fxcompress import frechet_distance

Denoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def balanced_labels(count: int) -> torch.Tensor:
    """`count` labels cycling through the classes (0, 1, ..., 9, 0, 1, ...)."""
    return torch.arange(count) % CLASSES


def real_test_images(count: int) -> torch.Tensor:
    """The first `count` test images."""
    return fashion_images("test")[0][:count]


def sample_batched(denoiser: Denoise, labels: torch.Tensor, steps: int, seed: int, batch: int = 250) -> torch.Tensor:
    """`sample` in batches of `batch` labels, batch i seeded with `seed + i` (the same noise for any denoiser)."""
    chunks = [sample(denoiser, labels[start:start + batch], steps, seed + index)
              for index, start in enumerate(range(0, len(labels), batch))]
    return torch.cat(chunks)


def scores(samples: torch.Tensor, labels: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    """Fréchet distance of `samples` to `real` in classifier features, and the classifier's accuracy on them."""
    distance = frechet_distance(fashion_classifier.features(samples), fashion_classifier.features(real))
    accuracy = (fashion_classifier.predict(samples) == labels).float().mean().item()
    return {"frechet_distance": round(distance, 4), "classifier_accuracy": round(accuracy, 4)}


def quality(denoiser: Denoise, count: int = 500, steps: int = SAMPLE_STEPS, seed: int = 0) -> dict[str, float]:
    """{"frechet_distance", "classifier_accuracy"} of `count` class-balanced samples against `count` test images."""
    labels = balanced_labels(count)
    return scores(sample_batched(denoiser, labels, steps, seed), labels, real_test_images(count))


def floor(count: int = 500) -> float:
    """The Fréchet distance between `count` real train images and `count` real test images."""
    train = fashion_images("train")[0][:count]
    return round(frechet_distance(fashion_classifier.features(train), fashion_classifier.features(
        real_test_images(count))), 4)


def grid(images: torch.Tensor, path: str | Path, per_row: int = 8) -> None:
    """Save images [N, 1, H, W] in [-1, 1] as a PNG grid of `per_row` columns."""
    torchvision.utils.save_image(images.clamp(-1, 1).add(1).div(2), str(path), nrow=per_row, padding=2,
                                 pad_value=1.0)


def grid_images(denoiser: Denoise, per_class: int = 8, steps: int = SAMPLE_STEPS, seed: int = 0) -> torch.Tensor:
    """`per_class` samples of each class, class by class (one grid row per class at `per_row=per_class`)."""
    labels = torch.arange(CLASSES).repeat_interleave(per_class)
    return sample(denoiser, labels, steps, seed)


def seconds_per_image(denoiser: Denoise, steps: int = SAMPLE_STEPS, batch: int = 10, repeats: int = 3) -> float:
    """Median over `repeats` of the time to sample `batch` images at `steps` steps, divided by `batch`."""
    labels = balanced_labels(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sample(denoiser, labels, steps, seed=0)
        times.append((time.perf_counter() - start) / batch)
    return statistics.median(times)


def report(kind: str, count: int, steps: int, seed: int) -> dict:
    denoiser = load(kind)
    record = {"kind": kind, "count": count, "steps": steps, "seed": seed, "sampler": "DDIM eta 0",
              **quality(denoiser, count, steps, seed), "real_train_vs_test_frechet_distance": floor(count),
              "seconds_per_image": round(seconds_per_image(denoiser, steps), 4), "timing": "eager, 1 thread, batch 10",
              "classifier_test_accuracy": json.loads((RESULTS / "classifier.json").read_text())["test_accuracy"]}
    grid(grid_images(denoiser, steps=steps, seed=seed), RESULTS / f"{kind}_grid.png")
    (RESULTS / f"{kind}_quality.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["report"])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--steps", type=int, default=SAMPLE_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(report(args.kind, args.count, args.steps, args.seed)), flush=True)


if __name__ == "__main__":
    main()
