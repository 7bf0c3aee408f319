"""The `fxcompress` command for deployment build steps.

  fxcompress demo       compress the pretrained MobileNetV2 with the exact passes and time it (default)
  fxcompress compress   compress a model and write the artifact (.pt2, .onnx or TensorRT), plan and report
  fxcompress bench      time original vs compressed on chosen lowerings and batch sizes
  fxcompress prune      make a model shallower by a method's fine-tuning loop on a data set
  fxcompress plot       draw a run's trajectory
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
from pathlib import Path
from typing import Callable

import torch
from torch.utils import _pytree as pytree

from .api import activation_names, compress
from .backends import LOWERINGS, lower_module
from .backends.onnxruntime import export_onnx
from .backends.precision import PRECISIONS, cast
from .backends.tensorrt import save_engine
from .capture import export_program, private_copy
from .errors import FxCompressError, MissingDependencyError, OptionError
from .measure import measure, speedup
from .models import call_reference, load_model
from .plan import Plan


def _example(args) -> tuple:
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(args.batch, 3, args.size, args.size, generator=generator),)


def _plan(args, model, example) -> Plan:
    if args.plan:
        return Plan.load(args.plan)
    if args.linearize_fraction:
        names = activation_names(model, example)
        count = round(args.linearize_fraction * len(names))
        return Plan.linearize(names[len(names) - count:], model=args.model)
    return Plan()


def _batch_dim(args) -> bool | None:
    """--dynamic-batch: dynamic or an error; --static-batch: the example's; neither: dynamic where the model allows
    (as `compress`)."""
    return True if getattr(args, "dynamic_batch", False) else False if getattr(args, "static_batch", False) else None


def _compress(args, model, example):
    return compress(model, example, plan=_plan(args, model, example), force=args.force,
                    allow_approximate=args.allow_approximate, dynamic_batch=_batch_dim(args))


def _package_version() -> str:
    try:
        return importlib.metadata.version("fxcompress")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _names(given: str | None, prefix: str, count: int) -> list[str]:
    """The names of an artifact's inputs or outputs: given (comma-separated), else `prefix` (`prefix_i` for
    several)."""
    if given:
        names = given.split(",")
        if len(names) != count:
            raise OptionError(f"--{prefix}-names: {len(names)} name(s) given for {count} {prefix}(s)")
        return names
    return [prefix] if count == 1 else [f"{prefix}_{index}" for index in range(count)]


def _latency_summary(timing: dict) -> dict:
    """A measurement in one row: medians and quartiles (ms) of each model, compressed / original and, where the
    exact model was timed too, compressed / exact."""
    results = timing["results"]
    row = {"lowering": timing["lowering"], "batch": timing["batch"], "device": timing["device"],
           "precision": timing["precision"], "threads": timing["machine"]["threads"]}
    for name, result in results.items():
        row.update({f"{name}_ms": round(result["median_ms"], 4),
                    f"{name}_quartiles_ms": [round(result["q1_ms"], 4), round(result["q3_ms"], 4)]})
    compressed = results["compressed"]["median_ms"]
    row["ratio"] = round(compressed / results["original"]["median_ms"], 4)
    if "exact" in results:
        row["ratio_to_exact"] = round(compressed / results["exact"]["median_ms"], 4)
    return row


def _speedups(row: dict) -> str:
    words = f"compressed / original {row['ratio']:.3f} ({speedup(row['ratio'])})"
    if "ratio_to_exact" in row:
        words += f", / exact {row['ratio_to_exact']:.3f} ({speedup(row['ratio_to_exact'])})"
    return words


def _check_output_folder(option: str, folder: Path) -> None:
    """Refuse, before any work, a folder that cannot be created or written."""
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not existing.is_dir():
        raise OptionError(f"{option} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OptionError(f"{option} {folder}: folder {existing} is not writable")


def _check_output_file(option: str, path: str | None) -> None:
    """Refuse, before any work, a file path whose folder is missing or not writable."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise OptionError(f"{option} {path} is a folder; expected the path of a file to write")
    if not path.parent.is_dir():
        raise OptionError(f"{option} {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK) or path.exists() and not os.access(path, os.W_OK):
        raise OptionError(f"{option} {path} is not writable")


def demo(args) -> int:
    _check_output_file("--report", args.report)
    model = load_model(args.model)
    example = _example(args)
    result = _compress(args, model, example)
    timing = measure({"original": model, "compressed": result.module}, example, lowering=args.lowering,
                     repeats=args.repeats)
    result.report.latency = _latency_summary(timing)
    print(f"model: {args.model}, input {tuple(example[0].shape)}")
    print(result.report)
    print(f"{args.lowering}, batch {args.batch}: {_speedups(result.report.latency)}")
    if args.report:
        result.report.save(args.report)
        print(f"report written to {args.report}")
    return 0


def _in_precision(module, example, precision: str) -> tuple:
    """A copy of `module` and `example` cast to `precision`, checked to run here."""
    if precision == "fp32":
        return module, example
    module, example = cast(module, example, precision)
    try:
        with torch.no_grad():
            module(*example)
    except RuntimeError as error:
        raise OptionError(f"--precision {precision}: the compressed model does not run in {PRECISIONS[precision]} "
                          f"on this machine ({str(error).strip().splitlines()[0]}); use fp32") from error
    return module, example


def write_artifact(module, example, lowering: str, out: Path, precision: str, dynamic_batch: bool, plan: Plan,
                   args) -> Path:
    """The deployment artifact of `lowering` in `precision` (weights and floating-point inputs cast; TensorRT: the
    engine's), with a symbolic batch axis where asked; the plan and the package version go into its metadata
    (ONNX metadata properties; `fxcompress.json` among a .pt2's extra files), ONNX with its opset and names."""
    if lowering != "tensorrt":
        module, example = _in_precision(module, example, precision)
    metadata = {"fxcompress_version": _package_version(), "fxcompress_plan": plan.to_json()}
    if lowering == "onnxruntime":
        with torch.no_grad():
            outputs = len([t for t in pytree.tree_leaves(module(*example)) if isinstance(t, torch.Tensor)])
        return export_onnx(module, example, out / "model.onnx", dynamic_batch, opset=args.opset, metadata=metadata,
                           input_names=_names(args.input_names, "input", len(example)),
                           output_names=_names(args.output_names, "output", outputs))
    if lowering == "tensorrt":
        path = out / "model_trt.ep"
        save_engine(lower_module(module, example, "tensorrt", precision=precision), example, path)
        return path
    path = out / "model.pt2"
    torch.export.save(export_program(private_copy(module), example, dynamic_batch), path,
                      extra_files={"fxcompress.json": json.dumps(metadata)})
    return path


def _check_artifact_options(args) -> None:
    if args.lowering == "onnxruntime" and args.precision == "bf16":
        raise OptionError("--precision bf16 is not supported with --lowering onnxruntime (ONNX Runtime has no "
                          "bfloat16 convolutions); use fp16 or fp32")
    if args.dynamic_batch and args.lowering == "tensorrt":
        raise OptionError("--dynamic-batch is not supported with --lowering tensorrt (its engine takes the "
                          "example's shape); use eager, inductor or onnxruntime")


def compress_command(args) -> int:
    _check_artifact_options(args)
    _check_output_folder("--out", Path(args.out))
    model = load_model(args.model)
    example = _example(args)
    result = _compress(args, model, example)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dynamic = result.dynamic_batch and args.lowering != "tensorrt"
    artifact = write_artifact(result.module, example, args.lowering, out, args.precision, dynamic, result.plan, args)
    result.plan.save(out / "plan.json")
    result.report.save(out / "report.json")
    print(result.report)
    print(f"\nwrote {artifact}, {out / 'plan.json'}, {out / 'report.json'}")
    return 0


def bench_command(args) -> int:
    """Time the original and the compressed model (and, with a plan, the exact model: the original with the exact
    passes only, the fair baseline) on each lowering, batch size and precision, interleaved."""
    _check_output_file("--json", args.json)
    model = load_model(args.model)
    rows = []
    for batch in args.batch_sizes:
        args.batch = batch
        example = _example(args)
        result = _compress(args, model, example)
        models = {"original": model, "compressed": result.module}
        if result.plan.decisions:
            models["exact"] = compress(model, example, force=args.force, allow_approximate=args.allow_approximate,
                                       dynamic_batch=result.dynamic_batch).module
        for precision in args.precisions:
            for lowering in args.lowering:
                timing = measure(models, example, lowering=lowering, repeats=args.repeats, device=args.device,
                                 precision=precision)
                rows.append({"model": args.model, **_latency_summary(timing),
                             "macs_ratio": round(result.report.after.macs / result.report.before.macs, 3),
                             "machine": timing["machine"]})
                print(f"{args.model:20} {lowering:12} {precision} batch {batch:3}  original "
                      f"{rows[-1]['original_ms']:9.3f} ms  compressed {rows[-1]['compressed_ms']:9.3f} ms  "
                      f"{_speedups(rows[-1])}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


ARTIFACTS = ("model.pt2", "model.onnx", "model_trt.ep")
DEFAULT_LOWERING = "onnxruntime"  # of every command: the artifact, the timing, the loop's latency


def _prepare_run_folder(args) -> None:
    """Refuse a run folder that is not writable, or that holds anything while neither --resume nor --force is
    given; --force deletes the files of an earlier run and its artifact."""
    from .finetune.run_folder import RunFolder

    folder = RunFolder(args.out)
    _check_output_folder("--out", folder.path)  # a file there is refused too
    held = folder.files()
    if args.resume and args.force:
        raise OptionError("give --resume or --force, not both")
    if args.resume and not folder.holds_run():
        raise OptionError(f"--resume: {folder.path} holds no run to resume (no checkpoint.pt)")
    if held and not (args.resume or args.force):
        raise OptionError(f"--out {folder.path} is not empty ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''})"
                          "; pass --resume to continue its run or --force to start over")
    if args.force:
        folder.clear()
        for name in ARTIFACTS:
            (folder.path / name).unlink(missing_ok=True)


def prune_command(args) -> int:
    from .data import fashion_mnist_splits
    from .finetune import distributed
    from .finetune.loop import prune
    from .finetune.run_folder import RunFolder
    from .finetune.trainer import TrainConfig
    from .models import with_classes

    distributed.init_from_env()
    refusal = None
    if distributed.is_main():
        try:
            _prepare_run_folder(args)
        except OptionError as error:
            refusal = str(error)
    refusal = distributed.broadcast_object(refusal)
    if refusal:
        raise OptionError(refusal)
    out = Path(args.out)
    train_config = TrainConfig(optimizer=args.optimizer, lr=args.lr, schedule=args.schedule,
                               label_smoothing=args.label_smoothing, distill=args.distill,
                               temperature=args.temperature, batch_size=args.batch_size,
                               max_batches=args.max_batches, workers=args.workers,
                               progress=distributed.is_main() and not args.quiet)
    if args.data == "fashion-mnist":
        data = fashion_mnist_splits(args.size, validation=args.validation_samples, train_samples=args.train_samples,
                                    test_samples=args.test_samples, seed=args.seed, flip=True)
        model = with_classes(load_model(args.model), data.classes)
        example = (torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)),)
        objective = None
    else:
        data = load_task(args.data)
        model, example, objective = load_model(args.model), tuple(data.example), getattr(data, "objective", None)
    result = prune(model, example, method=args.method, data=data, objective=objective, train_config=train_config,
                   out=out, resume=args.resume, device=args.device, steps=args.steps, progress=not args.quiet,
                   hooks=_log_hooks(args.log, out),
                   save_steps=args.save_steps,
                   per_step=args.per_step, epochs_per_step=args.epochs_per_step, dense_epochs=args.dense_epochs,
                   max_drop=args.max_drop, activations=args.activations, macs_ratio=args.macs_ratio,
                   latency_ratio=args.latency_ratio, lowering=args.lowering, measure_latency=args.latency,
                   selection=args.selection, method_options=method_options(args), only=args.only, seed=args.seed,
                   anneal=args.anneal, rewind=args.rewind, latency_threads=args.latency_threads)
    if distributed.is_main():
        compressed = compress(result.model, example, dynamic_batch=_batch_dim(args))
        artifact = write_artifact(compressed.module, example, args.lowering, out, "fp32",
                                  compressed.dynamic_batch and args.lowering != "tensorrt", compressed.plan, args)
        RunFolder(out).save_plan(result.plan)
        kept = result.trajectory.steps[result.trajectory.kept]
        print(f"stopped: {result.trajectory.stopped}; kept step {kept['step']}: "
              f"{kept['activations_linearised']} activations linearised, {kept['blocks_removed']} blocks removed, "
              f"sparsity {kept['sparsity']:.3f}, weight layers "
              f"{kept['dense_weight_layers']} -> {kept['weight_layers']}, validation {kept['validation']:.4f}, "
              f"test {kept['test']:.4f}")
        print(f"wrote {out / 'trajectory.json'}, {out / 'plan.json'}, {artifact} and {out / 'kept.pt'} (the kept "
              "model, planned and trainable: torch.load(path, weights_only=False))")
    distributed.shutdown()
    return 0


LOGS = ("csv", "tensorboard")


def _log_hooks(logs: list[str], out: Path) -> list:
    """The loop's hooks of `--log`: log.csv and tensorboard/ in the run folder."""
    from .finetune.hooks import CsvLog, TensorBoardLog
    return [CsvLog(out / "log.csv") if log == "csv" else TensorBoardLog(out / "tensorboard") for log in logs]


def plot_command(args) -> int:
    """Draw a run's trajectory: validation and test per step, latency and MACs ratios, training loss per epoch."""
    from .finetune.run_folder import RunFolder
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise MissingDependencyError("fxcompress plot needs matplotlib: pip install 'fxcompress[bench]'") from error
    folder = RunFolder(args.run)
    trajectory = folder.trajectory()
    if trajectory is None:
        raise OptionError(f"{folder.path} holds no trajectory.json: not a run folder")
    steps = trajectory["steps"]
    figure, (scores, costs, losses) = plt.subplots(1, 3, figsize=(14, 4))
    numbers = [step["step"] for step in steps]
    for split in ("validation", "test"):
        scores.plot(numbers, [step[split] for step in steps], marker="o", label=split)
    scores.axvline(trajectory["kept"], color="grey", linestyle=":", label="kept step")
    for field in ("macs_ratio", "latency_ratio"):
        if all(field in step for step in steps):
            costs.plot(numbers, [step[field] for step in steps], marker="o", label=field.replace("_", " "))
    epochs = [epoch for step in steps for epoch in step.get("epochs", [])]
    losses.plot([epoch["epoch"] for epoch in epochs], [epoch["loss"] for epoch in epochs], marker=".")
    for axes, title, xlabel in ((scores, "score", "step"), (costs, "compressed / dense", "step"),
                                (losses, "training loss", "epoch")):
        axes.set(title=title, xlabel=xlabel)
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    figure.suptitle(f"{folder.path}: {trajectory['settings']['method']}, stopped: {trajectory['stopped']}",
                    fontsize=9)
    figure.tight_layout()
    path = Path(args.out) if args.out else folder.path / "trajectory.png"
    figure.savefig(path, dpi=90)
    print(f"wrote {path}")
    return 0


def _method_flags() -> dict[str, tuple]:
    """Each method option's flag -> (its argparse destination, the options declaring it, by method)."""
    from .finetune.methods import METHODS

    flags: dict[str, tuple] = {}
    for name, method in METHODS.items():
        for option in method.options:
            dest = option.cli_flag[2:].replace("-", "_")
            flags.setdefault(option.cli_flag, (dest, {}))[1][name] = option
    return flags


def method_options(args) -> dict:
    """The options of `args.method` given on the command line; a flag of another method is refused."""
    options = {}
    for flag, (dest, declared) in _method_flags().items():
        value = getattr(args, dest)
        if value is None:
            continue
        if args.method not in declared:
            raise OptionError(f"{flag} is an option of method {' / '.join(declared)}, not of {args.method}")
        options[declared[args.method].name] = value
    return options


def load_task(reference: str):
    """The task of `--data package.module:factory`: a `fxcompress.Task`, or any object with its fields (train,
    validation and test datasets or DataLoaders, the model's example inputs, optionally an objective)."""
    if ":" not in reference:
        raise OptionError(f"--data must be fashion-mnist or package.module:factory, got {reference!r}")
    task = call_reference(reference, "data reference")
    splits = (torch.utils.data.Dataset, torch.utils.data.DataLoader)
    missing = [name for name in ("train", "validation", "test") if not isinstance(getattr(task, name, None), splits)]
    missing += [] if hasattr(task, "example") else ["example"]
    if missing:
        raise OptionError(f"{reference} returned a {type(task).__name__} without {', '.join(missing)}: return a "
                          "fxcompress.Task (train, validation and test datasets or DataLoaders, example, optionally "
                          "objective), e.g. fashion_mnist_splits(64).task(example)")
    return task


def _checked(text: str, convert, accept, expected: str):
    """`text` converted, or the ArgumentTypeError argparse turns into exit code 2."""
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or not accept(value):  # a comparison with nan is False: refused too
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _checked(text, int, lambda value: value >= 1, "an integer >= 1")


def _non_negative_int(text: str) -> int:
    return _checked(text, int, lambda value: value >= 0, "an integer >= 0")


def _non_negative(text: str) -> float:
    return _checked(text, float, lambda value: 0 <= value < float("inf"), "a number >= 0")


def _checked_anneal(text: str) -> float:
    return _checked(text, float, lambda value: 0 <= value < 1, "a number in [0, 1)")


def _batch_sizes(text: str) -> list[int]:
    try:
        return [_positive_int(b) for b in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}") from None


def _device(text: str) -> str:
    try:
        kind = torch.device(text).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r} is not available here (no CUDA); use cpu")
    return text


def _names_of(kind: str, valid) -> Callable[[str], list[str]]:
    """An argparse type: comma-separated names, each one of `valid`."""
    def parse(text: str) -> list[str]:
        names = text.split(",")
        unknown = [name for name in names if name not in valid]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {kind} {unknown[0]!r}; valid: {', '.join(valid)}")
        return names
    return parse


def _fraction(text: str) -> float:
    return _checked(text, float, lambda value: 0 <= value <= 1, "a number in [0, 1]")


def _option_type(option):
    """The argparse type of a method option: its type, numbers checked against its bounds."""
    if option.type is bool:
        return lambda text: _checked(text, lambda value: {"true": True, "false": False}.get(value.lower()),
                                     lambda value: True, "true or false")
    if option.type not in (int, float):
        return option.type
    low, high = option.bounds
    what = "an integer" if option.type is int else "a number"
    expected = f"{what} in [{low:g}, {high:g}]" if high < float("inf") else \
        f"{what} >= {low:g}" if low > float("-inf") else what
    return lambda text: _checked(text, option.type, lambda value: low <= value <= high, expected)



def _artifact_arguments(parser) -> None:
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--dynamic-batch", action="store_true",
                       help="require a symbolic batch dimension (an error where the model fixes it); by default the "
                            "artifact takes any batch size where the model allows it")
    batch.add_argument("--static-batch", action="store_true", help="fix the artifact to the example's batch size")
    parser.add_argument("--opset", type=_positive_int, help="ONNX opset version (default: the exporter's)")
    parser.add_argument("--input-names", help="ONNX input names, comma-separated (default: input, or input_i)")
    parser.add_argument("--output-names", help="ONNX output names, comma-separated (default: output, or output_i)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxcompress", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")

    def command(name, handler, help_text, default_model):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("model", nargs="?", default=default_model,
                         help="pretrained_mobilenet_v2, a torchvision model name (random weights), "
                              "package.module:factory, or a saved ExportedProgram (.pt2)")
        sub.add_argument("--size", type=_positive_int, default=224, help="input resolution (inputs are N x 3 x S x S)")
        sub.add_argument("--plan", help="a plan JSON file to apply")
        sub.add_argument("--linearize-fraction", type=_fraction, default=0.0,
                         help="linearise the deepest fraction of activations (a latency study, not accuracy)")
        sub.add_argument("--force", action="store_true", help="merge even where MACs would grow")
        sub.add_argument("--allow-approximate", action="store_true", help="allow border-approximate conv merges")
        sub.set_defaults(handler=handler)
        return sub

    demo_parser = command("demo", demo, "compress a model with the exact passes and time it (default)",
                          "pretrained_mobilenet_v2")
    demo_parser.add_argument("--batch", type=_positive_int, default=1)
    demo_parser.add_argument("--lowering", choices=list(LOWERINGS), default=DEFAULT_LOWERING)
    demo_parser.add_argument("--repeats", type=_positive_int, default=20)
    demo_parser.add_argument("--report", help="also write the report as JSON to this path")

    compress_parser = command("compress", compress_command, "compress a model and write artifact, plan, report",
                              None)
    compress_parser.add_argument("--batch", type=_positive_int, default=1)
    compress_parser.add_argument("--lowering", choices=list(LOWERINGS), default=DEFAULT_LOWERING,
                                 help="the artifact: .onnx (onnxruntime), .pt2 (eager, inductor), TensorRT")
    compress_parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                                 help="artifact precision: weights and inputs cast (bf16 not with onnxruntime)")
    compress_parser.add_argument("--out", default="fxcompress-out", help="output folder")
    _artifact_arguments(compress_parser)

    bench_parser = command("bench", bench_command, "time original vs compressed", None)
    bench_parser.add_argument("--lowering", type=_names_of("lowering", LOWERINGS), default=[DEFAULT_LOWERING],
                              help=f"comma-separated, of {', '.join(LOWERINGS)}")
    bench_parser.add_argument("--batch-sizes", type=_batch_sizes, default=[1], help="comma-separated")
    bench_parser.add_argument("--repeats", type=_positive_int, default=20)
    bench_parser.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N")
    bench_parser.add_argument("--precisions", type=_names_of("precision", PRECISIONS), default=["fp32"],
                              help="comma-separated: fp32, fp16, bf16 (weights and inputs cast)")
    bench_parser.add_argument("--json", help="write the rows as JSON to this path")
    _prune_parser(commands)
    plot_parser = commands.add_parser("plot", help="draw a run's trajectory (scores, costs, training loss)")
    plot_parser.add_argument("run", help="the run folder of fxcompress prune")
    plot_parser.add_argument("--out", help="the image to write (default RUN/trajectory.png)")
    plot_parser.set_defaults(handler=plot_command, model="")
    return parser


def _prune_parser(commands) -> None:
    from .finetune.methods import METHODS, SELECTIONS
    from .finetune.trainer import OPTIMIZERS, SCHEDULES

    sub = commands.add_parser("prune", help="make a model shallower by a method's fine-tuning loop")
    sub.add_argument("model", nargs="?", default=None,
                     help="as for compress; its last linear layer is replaced to fit the data set's classes")
    sub.add_argument("--method", choices=list(METHODS), default="easier")
    sub.add_argument("--data", default="fashion-mnist",
                     help="fashion-mnist (3 x size x size, ImageNet-normalised; the model's head is fitted to its "
                          "10 classes), or package.module:factory returning a task: train, validation and test "
                          "datasets, the model's example inputs (example) and optionally an objective "
                          "(fxcompress.finetune.objectives.Denoising for a diffusion denoiser)")
    sub.add_argument("--size", type=_positive_int, default=64, help="input resolution (fashion-mnist)")
    sub.add_argument("--out", required=True, help="run folder: checkpoint, trajectory, plan, weights, artifact")
    sub.add_argument("--resume", action="store_true", help="continue the run in --out")
    sub.add_argument("--force", action="store_true", help="start over, deleting the run in --out")
    sub.add_argument("--max-drop", type=_fraction, default=0.01,
                     help="largest validation accuracy drop from the dense model (0.01 = 1 point)")
    sub.add_argument("--steps", type=_positive_int, help="at most this many steps")
    sub.add_argument("--per-step", type=_positive_int, default=1, help="activations chosen per step")
    sub.add_argument("--epochs-per-step", type=_non_negative_int, default=1, help="fine-tuning after each step")
    sub.add_argument("--dense-epochs", type=_non_negative_int, default=0,
                     help="train the dense model first (new data; LaCoOT: with its regulariser)")
    sub.add_argument("--activations", type=_positive_int, help="budget: activations linearised")
    sub.add_argument("--macs-ratio", type=_fraction, help="budget: compressed / dense MACs")
    sub.add_argument("--latency-ratio", type=_fraction, help="budget: compressed / dense latency on --lowering")
    sub.add_argument("--latency", action="store_true", help="measure the latency ratio at every step")
    sub.add_argument("--lowering", choices=["onnxruntime", "inductor", "eager", "cudagraphs",
                                            "inductor-reduce-overhead"], default=DEFAULT_LOWERING,
                     help="where latency is measured (on --device), and the artifact written at the end")
    sub.add_argument("--device", type=_device,
                     help="cpu, cuda or cuda:N (default: the GPU of this rank where CUDA is available, else cpu)")
    sub.add_argument("--save-steps", action="store_true", help="keep every step's model (steps/<step>.pt)")
    sub.add_argument("--workers", type=_non_negative_int, default=0, help="data loader worker processes")
    sub.add_argument("--quiet", action="store_true", help="no step lines and no progress bars")
    sub.add_argument("--log", type=_names_of("log", LOGS), default=[],
                     help="comma-separated: csv (log.csv), tensorboard (tensorboard/): each step and training epoch, "
                          "in the run folder")
    _artifact_arguments(sub)
    sub.add_argument("--latency-threads", type=_positive_int, help="CPU threads latency is measured on "
                     "(default: those training runs on)")
    sub.add_argument("--anneal", type=_checked_anneal, default=0.0,
                     help="fraction of each step's fine-tuning over which its decisions are blended in (0: at once)")
    sub.add_argument("--rewind", action="store_true", help="fine-tune each step from the initial weights, under its "
                     "masks (lottery-ticket retraining; a pruning method with --collapse false)")
    sub.add_argument("--selection", choices=list(SELECTIONS), default="criterion")
    sub.add_argument("--only", help="a regular expression: choose only activations or blocks whose names match")
    for flag, (dest, declared) in _method_flags().items():
        option = next(iter(declared.values()))
        sub.add_argument(flag, dest=dest, type=_option_type(option), choices=list(option.choices) or None,
                         help=f"{', '.join(declared)}: {option.help} (default {option.default})")
    sub.add_argument("--train-samples", type=_positive_int, help="cap on the training split (fashion-mnist)")
    sub.add_argument("--validation-samples", type=_positive_int, default=2000, help="(fashion-mnist)")
    sub.add_argument("--test-samples", type=_positive_int,
                     help="cap on the test split (fashion-mnist; default: all 10k)")
    sub.add_argument("--optimizer", choices=list(OPTIMIZERS), default="sgd")
    sub.add_argument("--schedule", choices=list(SCHEDULES), default="cosine")
    sub.add_argument("--lr", type=float, default=0.01)
    sub.add_argument("--label-smoothing", type=_fraction, default=0.0)
    sub.add_argument("--distill", type=_fraction, default=0.0,
                     help="weight of knowledge distillation from the dense model (dsd2: 0.8 unless set)")
    sub.add_argument("--temperature", type=float, default=4.0, help="of the distillation (dsd2: 10 unless "
                     "--distill is set)")
    sub.add_argument("--batch-size", type=_positive_int, default=64)
    sub.add_argument("--max-batches", type=_positive_int, help="cap on batches per epoch (smoke runs)")
    sub.add_argument("--seed", type=int, default=0)
    sub.set_defaults(handler=prune_command)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv or ["demo"])
    if args.model is None:
        parser.error(f"{args.command}: a model is required")
    try:
        return args.handler(args)
    except FxCompressError as error:
        print(f"fxcompress: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
