"""The `fxcompress` command. Without arguments it runs the main job on the pretrained MobileNetV2:
capture, exact passes, report, and CPU latency of original vs compressed on the same lowering."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from .api import compress
from .backends import LOWERINGS, lower_module
from .errors import FxCompressError
from .measure import measure_latency
from .models import pretrained_mobilenet_v2, torchvision_model


def demo(args) -> int:
    model = pretrained_mobilenet_v2() if args.model == "pretrained_mobilenet_v2" else torchvision_model(args.model)
    example = (torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)),)
    result = compress(model, example)
    latency = measure_latency({"original": lower_module(model, args.lowering),
                               "compressed": lower_module(result.module, args.lowering)}, example,
                              repeats=args.repeats)
    original, compressed = (latency["results"][k]["median_ms"] for k in ("original", "compressed"))
    result.report.latency = {"lowering": args.lowering, "batch": args.batch, "original_ms": round(original, 3),
                             "compressed_ms": round(compressed, 3), "ratio": round(compressed / original, 3),
                             "threads": latency["threads"]}
    print(f"model: {args.model}, input {tuple(example[0].shape)}")
    print(result.report)
    if args.report:
        result.report.save(args.report)
        print(f"report written to {args.report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxcompress", description=__doc__)
    commands = parser.add_subparsers(dest="command")
    run = commands.add_parser("demo", help="compress a model with the exact passes and time it (default)")
    run.add_argument("--model", default="pretrained_mobilenet_v2",
                     help="pretrained_mobilenet_v2 (default) or a torchvision model name (random weights)")
    run.add_argument("--batch", type=int, default=1)
    run.add_argument("--size", type=int, default=224, help="input resolution")
    run.add_argument("--lowering", choices=sorted(LOWERINGS), default="eager")
    run.add_argument("--repeats", type=int, default=20)
    run.add_argument("--report", help="also write the report as JSON to this path")
    run.set_defaults(handler=demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv or ["demo"])
    try:
        return args.handler(args)
    except FxCompressError as error:
        print(f"fxcompress: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
