"""The data-free BatchNorm criterion (TLC) on the pretrained MobileNetV2, at several thresholds.

For each max_error tau, with the layer error taken as the largest channel error probability (--taus,
the strict rule the backend uses) or as the mean one, the expected fraction of misjudged channels
(--mean-taus): the plan the criterion finds (no data), how many activations it linearises and
channels it removes, weight layers and MACs after the exact merges, and how often the compressed model's
top-1 ImageNet class equals the original's on real images (Fashion-MNIST test images, grayscale 28x28
replicated to 3 channels, resized to 224 and ImageNet-normalised: real photographs, but far outside
ImageNet's distribution, so agreement measures faithfulness to the original, not accuracy).

    .venv/bin/python bench/bn_criterion_mobilenet_v2.py [--images 300] [--taus 0.01 0.45] [--mean-taus 0.15 0.2 0.25]

Writes bench/results/bn_criterion_mobilenet_v2.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import fxcompress
from fxcompress.data import fashion_mnist, imagenet_batches
from fxcompress.models import pretrained_mobilenet_v2

RESULTS = Path(__file__).parent / "results"


@torch.no_grad()
def top1(model, batches) -> torch.Tensor:
    return torch.cat([model(batch).argmax(1) for batch in batches])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--taus", type=float, nargs="+", default=[0.01, 0.45])
    parser.add_argument("--mean-taus", type=float, nargs="+", default=[0.15, 0.2, 0.25])
    args = parser.parse_args()
    torch.manual_seed(0)
    model = pretrained_mobilenet_v2()
    images, _ = fashion_mnist("test")
    batches = list(imagenet_batches(images[:args.images], args.batch))
    reference = top1(model, batches)
    example = (batches[0],)  # export pins the batch size
    rows = []
    settings = [(None, "")] + [(tau, "max") for tau in args.taus] + [(tau, "mean") for tau in args.mean_taus]
    for tau, aggregate in settings:
        start = time.perf_counter()
        options = {} if tau is None else {"criterion": "bn", "max_error": tau,
                                           "planner": {"aggregate": aggregate}}
        result = fxcompress.compress(model, example, **options)
        before, after = result.report.before, result.report.after
        agreement = (top1(result.module, batches) == reference).float().mean().item()
        channels = {action: sum(len(d.params["channels"]) for d in result.plan.decisions
                                if d.action == action) for action in ("remove_channels", "zero_channels")}
        rows.append({"max_error": tau, "aggregate": aggregate,
                     "activations_linearised": len(result.plan.targets("linearize")),
                     "channels_removed": channels["remove_channels"], "channels_zeroed": channels["zero_channels"], "activations_before": before.activations,
                     "weight_layers_before": before.weight_layers, "weight_layers_after": after.weight_layers,
                     "weight_layers_merged": before.weight_layers - after.weight_layers,
                     "macs_ratio": after.macs / before.macs, "top1_agreement": agreement,
                     "seconds": time.perf_counter() - start})
        print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    setup = {"model": "torchvision mobilenet_v2 IMAGENET1K_V1", "images": args.images,
             "data": "Fashion-MNIST test[:images], 3x224x224 ImageNet-normalised", "torch": torch.__version__}
    (RESULTS / "bn_criterion_mobilenet_v2.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))
    lines = ["| τ (layer error) | activations linearised | channels removed / zeroed | weight layers (merged) | "
             "MACs ratio | top-1 agreement |", "|---|---|---|---|---|---|"]
    for row in rows:
        tau = "exact passes only" if row["max_error"] is None else f"{row['max_error']:g} ({row['aggregate']})"
        lines.append(f"| {tau} | {row['activations_linearised']} / {row['activations_before']} | "
                     f"{row['channels_removed']} / {row['channels_zeroed']} | {row['weight_layers_before']} → "
                     f"{row['weight_layers_after']} ({row['weight_layers_merged']}) | {row['macs_ratio']:.3f} | {row['top1_agreement']:.3f} |")
    (RESULTS / "bn_criterion_mobilenet_v2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
