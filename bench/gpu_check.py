"""The prepared device check: every entry point's correctness on a GPU, the latency table, and a short run of the
fine-tuning loop, within one time budget, on a machine that has only torch and torchvision (nothing installed: the
package is found through PYTHONPATH, the depthprune backend passed as a callable where its entry point is missing).

  python bench/gpu_check.py prepare         here: copy the Fashion-MNIST IDX files into bench/gpu-data/
                                            (git-ignored: name it in the device call's `carry`)
  bash bench/gpu.sh                         there: `run` with the budget, JSON under $OUT
  python bench/gpu_check.py run --out DIR [--device cuda] [--budget 420] [--smoke]
  python bench/gpu_check.py report DIR      here: DIR's JSON into bench/results/gpu/ (table and plot)

Stages, each written to DIR/gpu_check.json as soon as it ends (a stage that fails records its error and the next
one runs):
1. correctness: compress (exact and with the iterative loop's committed plan), apply_plan, the depthprune backend
   with the eager, inductor and cudagraphs lowerings, reduce_tokens, the compressed module's `.to()/.half()/
   save/load`, and a 2-step `prune` on the device; each output against eager (float32, no TF32) with its tolerance.
2. latency: MobileNetV2 (original, exact = BatchNorms folded, the committed plans of the iterative loop and of the
   one-shot selection, every inverted residual collapsed), ResNet-18 and -50 (original, exact), the Fashion ViT
   (original, exact, FOLDER) and ViT-B/16 (original, FOLDER); eager, cudagraphs and inductor-reduce-overhead; fp32
   and fp16; batch 1, 32 and 128; medians of CUDA-event timings, interleaved, ratios against the original and the
   exact model. Groups run in priority order while the budget lasts; the rest are recorded as skipped.
3. prune: the one-shot selection (criterion importance, cudagraphs latency at batch 1) and the control, trained
   the same number of batches of the full training split, as many as the budget leaves.
`--smoke` runs the same code on small inputs with few repeats (the test suite runs it on the CPU).
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import shutil
import sys
import tempfile
import time
import traceback
from importlib.metadata import entry_points
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from fxcompress import Plan, apply_plan, compress, measure, prune, reduce_tokens  # noqa: E402
from fxcompress.data import FASHION_MNIST_DIR, fashion_mnist_splits  # noqa: E402
from fxcompress.finetune.trainer import TrainConfig  # noqa: E402
from fxcompress.measure import machine  # noqa: E402
from fxcompress.verify import full_precision  # noqa: E402
import fashion_vit  # noqa: E402
from oneshot_fashion import collapse_plan  # noqa: E402

DATA = ROOT / "gpu-data"
RESULTS = ROOT / "results" / "gpu"
DENSE_FILE = ROOT / "results" / "prune" / "mobilenet_v2_dense_start.pt"
ITERATIVE_PLAN_FILE = ROOT / "results" / "oneshot" / "iterative_plan.json"  # the protocol's iterative run
ONESHOT_PLAN_FILE = ROOT / "results" / "oneshot" / "oneshot-probe-0.60_plan.json"  # the demo's plan
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz")
FOLDER = {"method": "folder", "layers": [1], "ratio": 0.66, "proportional_attention": True}
EXACT_TOLERANCE = 1e-4  # float32 without TF32: what the pipeline's own verification allows
COMPILED_TOLERANCE = 1e-3  # Inductor's fused kernels round differently
HALF_TOLERANCE = 2e-2


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.time() + seconds

    def left(self) -> float:
        return self.end - time.time()


def relative_error(reference, actual) -> float:
    reference, actual = reference.detach().double().cpu(), actual.detach().double().cpu()
    return float((actual - reference).abs().max() / reference.abs().max().clamp(min=1e-12))


# -- models and plans ---------------------------------------------------------------------------------------------

def mobilenet_v2() -> torch.nn.Module:
    """The dense start of the Fashion-MNIST runs: torchvision's MobileNetV2 with a 10-class head."""
    model = torchvision.models.mobilenet_v2(num_classes=10)
    model.load_state_dict({key: value.float() for key, value in torch.load(DENSE_FILE, weights_only=True).items()})
    return model.eval()


def iterative_plan():
    return Plan.load(ITERATIVE_PLAN_FILE)


def oneshot_plan():
    return Plan.load(ONESHOT_PLAN_FILE)


def fashion_vit_model() -> torch.nn.Module:
    return fashion_vit.load("torchvision")


def torchvision_model(name: str) -> torch.nn.Module:
    return getattr(torchvision.models, name)().eval()


def backend():
    """The depthprune backend: its registered name where the package is installed, else the callable."""
    if any(entry.name == "depthprune" for entry in entry_points(group="torch_dynamo_backends")):
        return "depthprune"
    from fxcompress.dynamo_backend import depthprune
    return depthprune


# -- 1. correctness -----------------------------------------------------------------------------------------------

def correctness(device: str, smoke: bool, deadline: Deadline) -> list[dict]:
    size, batch = (32, 2) if smoke else (64, 8)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=generator).to(device)
    model = mobilenet_v2().to(device)
    checks = [("compress, exact", lambda: check_compress(model, x, None)),
              ("compress, iterative plan", lambda: check_compress(model, x, iterative_plan())),
              ("compressed module: to, half, save/load, deepcopy", lambda: check_module(model, x, device)),
              ("reduce_tokens, Fashion ViT", lambda: check_tokens(device, batch))]
    lowerings = ("eager",) if device == "cpu" else ("eager", "cudagraphs", "inductor")
    checks += [(f"torch.compile depthprune, {lowering}", lambda lowering=lowering: check_backend(model, x, lowering))
               for lowering in lowerings]
    checks.append(("prune, 2 steps", lambda: check_prune(device, smoke)))
    results = []
    for name, check in checks:
        if deadline.left() < 0:
            results.append({"check": name, "skipped": "budget"})
            continue
        started = time.time()
        try:
            with full_precision():
                result = check()
        except Exception as error:  # a failed check is a result, and the next one still runs
            result = {"ok": False, "error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()[-2000:]}
        results.append({"check": name, **result, "seconds": round(time.time() - started, 1)})
        print(f"check {name}: {'ok' if result.get('ok') else 'FAILED ' + result.get('error', '')}", flush=True)
    return results


def _within(error: float, tolerance: float, **extra) -> dict:
    return {"ok": error <= tolerance, "relative_error": error, "tolerance": tolerance, **extra}


@torch.no_grad()
def check_compress(model, x, plan) -> dict:
    reference = model(x) if plan is None else apply_plan(model, plan, (x,)).eval()(x)
    result = compress(model, (x,), plan=plan)
    on_device = {t.device for t in result.module.state_dict().values()} == {x.device}
    return _within(relative_error(reference, result.module(x)), EXACT_TOLERANCE, weights_on_device=on_device,
                   weight_layers=[result.report.before.weight_layers, result.report.after.weight_layers])


@torch.no_grad()
def check_module(model, x, device: str) -> dict:
    module = compress(mobilenet_v2(), (x.cpu(),)).module.eval()
    reference = module(x.cpu())
    moved = copy.deepcopy(module).to(device)
    buffer = io.BytesIO()
    torch.save(moved, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    half = copy.deepcopy(moved).half()
    errors = {"moved": relative_error(reference, moved(x)), "loaded": relative_error(reference, loaded(x)),
              "half": relative_error(reference, half(x.half()).float())}
    ok = errors["moved"] <= EXACT_TOLERANCE and errors["loaded"] <= EXACT_TOLERANCE and \
        errors["half"] <= HALF_TOLERANCE
    return {"ok": ok, "relative_errors": errors}


@torch.no_grad()
def check_tokens(device: str, batch: int) -> dict:
    vit = fashion_vit_model().to(device)
    x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(1)).to(device)
    reduced = reduce_tokens(vit, FOLDER)
    compressed = compress(vit, (x,), tokens=FOLDER).module
    return _within(relative_error(reduced(x), compressed(x)), EXACT_TOLERANCE,
                   tokens_changed_output=relative_error(vit(x), reduced(x)) > EXACT_TOLERANCE)


@torch.no_grad()
def check_backend(model, x, lowering: str) -> dict:
    torch._dynamo.reset()
    reports = []
    compiled = torch.compile(model, backend=backend(), options={"lowering": lowering, "on_report": reports.append})
    first, second = compiled(x), compiled(x)  # the second call replays (CUDA graphs: from the recorded buffers)
    tolerance = COMPILED_TOLERANCE if lowering == "inductor" else EXACT_TOLERANCE
    reference = model(x)
    error = max(relative_error(reference, first), relative_error(reference, second))
    return _within(error, tolerance, compilations=len(reports),
                   weight_layers=[reports[0].before.weight_layers, reports[0].after.weight_layers] if reports else None)


def check_prune(device: str, smoke: bool) -> dict:
    data = fashion_mnist_splits(32, validation=256, train_samples=256, test_samples=256, root=data_root())
    example = (torch.randn(1, 3, 32, 32),)
    with tempfile.TemporaryDirectory() as folder:
        result = prune(mobilenet_v2(), example, method="easier", data=data, device=device, steps=2, max_drop=1.0,
                       train_config=TrainConfig(max_batches=2, batch_size=32, progress=False), out=folder,
                       progress=False)
        saved = torch.load(Path(folder) / "checkpoint.pt", map_location="cpu", weights_only=False)
    steps = result.trajectory.steps
    on_cpu = all(t.device.type == "cpu" for t in saved["state_dict"].values())
    return {"ok": len(steps) == 3 and on_cpu, "steps": len(steps), "checkpoint_loads_on_cpu": on_cpu,
            "validation": [step["validation"] for step in steps]}


def data_root() -> Path | None:
    return DATA if all((DATA / name).is_file() for name in FASHION_FILES) else None


# -- 2. latency ---------------------------------------------------------------------------------------------------

def variants(smoke: bool, device: str) -> list[dict]:
    """The latency groups in priority order: a model, its variants (name -> (model, compress options)), the input
    shape per batch, and which lowerings, precisions and batches to time."""
    size = 32 if smoke else 224
    mobilenet = mobilenet_v2()
    plans = {"exact": None, "iterative plan": iterative_plan(), "one-shot plan": oneshot_plan(),
             "full collapse": collapse_plan(mobilenet, (torch.randn(1, 3, size, size),))}
    gpu = device != "cpu"
    lowerings = ("cudagraphs", "eager") if gpu else ("eager",)
    batches = (1,) if smoke else (1, 32, 128)
    precisions = ("fp32",) if smoke else ("fp32", "fp16")
    groups = [{"model": "mobilenet_v2", "shape": (3, size, size), "base": mobilenet,
               "variants": {name: {"plan": plan} for name, plan in plans.items()},
               "lowerings": lowerings, "batches": batches, "precisions": precisions}]
    if gpu and not smoke:
        groups.append({"model": "mobilenet_v2", "shape": (3, size, size), "base": mobilenet,
                       "variants": {name: {"plan": plan} for name, plan in plans.items()},
                       "lowerings": ("inductor-reduce-overhead",), "batches": (32,), "precisions": ("fp32",)})
    if smoke:
        return groups
    for name in ("resnet18", "resnet50"):
        groups.append({"model": name, "shape": (3, 224, 224), "base": torchvision_model(name),
                       "variants": {"exact": {}}, "lowerings": lowerings, "batches": batches,
                       "precisions": precisions})
    groups.append({"model": "fashion_vit", "shape": (1, 28, 28), "base": fashion_vit_model(),
                   "variants": {"exact": {}, "FOLDER 66% after layer 1": {"tokens": FOLDER}},
                   "lowerings": lowerings, "batches": (1, 32, 128), "precisions": ("fp32",)})
    groups.append({"model": "vit_b_16", "shape": (3, 224, 224), "base": torchvision_model("vit_b_16"),
                   "variants": {"FOLDER 66% after layer 1": {"tokens": FOLDER}}, "lowerings": ("cudagraphs",),
                   "batches": (1, 64), "precisions": ("fp32", "fp16")})
    return groups


def latency(device: str, smoke: bool, deadline: Deadline, write) -> list[dict]:
    rows = []
    repeats, warmup = (2, 1) if smoke else (50, 10)
    for group in variants(smoke, device):
        if deadline.left() < 0:
            rows.append({"model": group["model"], "lowerings": group["lowerings"], "skipped": "budget"})
            continue
        try:
            models = compressed_variants(group, device)
        except Exception as error:  # one model that fails to compress does not stop the table
            rows.append({"model": group["model"], "error": f"{type(error).__name__}: {error}"})
            continue
        for batch in group["batches"]:
            example = (torch.randn(batch, *group["shape"], generator=torch.Generator().manual_seed(0)),)
            for precision in group["precisions"]:
                for lowering in group["lowerings"]:
                    row = {"model": group["model"], "batch": batch, "precision": precision, "lowering": lowering}
                    if deadline.left() < 0:
                        rows.append({**row, "skipped": "budget"})
                        continue
                    rows.append({**row, **timed(models, example, lowering, precision, device, warmup, repeats)})
                    print_row(rows[-1])
                    write(rows)
    return rows


def compressed_variants(group: dict, device: str) -> dict:
    """The group's model and its variants compressed once for any batch size, on the device (where compressing
    there fails, on the CPU, and the error is kept)."""
    example = (torch.randn(2, *group["shape"], generator=torch.Generator().manual_seed(0)),)
    models = {"original": group["base"]}
    for name, options in group["variants"].items():
        try:
            base = group["base"].to(device)
            models[name] = compress(base, tuple(t.to(device) for t in example), **options).module
        except Exception as error:  # recorded in the group's rows through the fallback's name
            group.setdefault("compressed_on_cpu", {})[name] = f"{type(error).__name__}: {error}"
            models[name] = compress(group["base"].cpu(), example, **options).module
    return models


def timed(models: dict, example, lowering: str, precision: str, device: str, warmup: int, repeats: int) -> dict:
    try:
        timing = measure(models, example, lowering=lowering, device=device, precision=precision, warmup=warmup,
                         repeats=repeats)
    except Exception as error:  # recorded: a lowering that fails for one model does not stop the table
        return {"error": f"{type(error).__name__}: {str(error)[:500]}"}
    results = timing["results"]
    exact = results.get("exact", results["original"])["median_ms"]
    return {"variants": {name: {"median_ms": r["median_ms"], "quartiles_ms": [r["q1_ms"], r["q3_ms"]],
                                "vs_original": r["ratio"], "vs_exact": r["median_ms"] / exact}
                         for name, r in results.items()}}


def print_row(row: dict) -> None:
    if "variants" not in row:
        print(row, flush=True)
        return
    cells = "  ".join(f"{name} {value['median_ms']:.3f} ms ({1 / value['vs_exact']:.2f}x vs exact)"
                      for name, value in row["variants"].items())
    print(f"{row['model']} batch {row['batch']} {row['precision']} {row['lowering']}: {cells}", flush=True)


# -- 3. prune -----------------------------------------------------------------------------------------------------

def prune_runs(device: str, smoke: bool, deadline: Deadline, out: Path) -> dict:
    """The one-shot selection and the control on the full training split, each trained the same number of batches:
    as many as the budget leaves (measured on a first short run), at most one epoch. Their folders go to `out`
    (not $OUT, which takes back few files): trajectories, plans and selection rounds go into the record."""
    data = fashion_mnist_splits(64, validation=5000, test_samples=512 if smoke else None, root=data_root(),
                                flip=True)
    example = (torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)),)
    lowering = "eager" if device == "cpu" else "cudagraphs"
    recipe = {"batch_size": 128, "lr": 0.01, "distill": 0.7, "temperature": 4.0, "progress": False}
    batches, results = (2 if smoke else None), {}
    for name, options in (("control", {"method": "control"}),
                          ("oneshot-criterion", {"method": "oneshot", "latency_ratio": 0.5, "anneal": 0.3,
                                                 "method_options": {"importance": "criterion"}})):
        started = time.time()
        if batches is None:  # as many batches as half the time left allows, from the control's first 20 batches
            probe = time.time()
            prune(mobilenet_v2(), example, data=data, device=device, method="control", steps=1, max_drop=1.0,
                  train_config=TrainConfig(max_batches=20, **recipe), progress=False)
            per_batch = (time.time() - probe) / 20
            batches = max(1, min(len(data.train) // recipe["batch_size"], int(deadline.left() / 2.5 / per_batch)))
        folder = out / name
        result = prune(mobilenet_v2(), example, data=data, device=device, steps=1, max_drop=1.0, out=folder,
                       lowering=lowering, measure_latency=True, train_config=TrainConfig(max_batches=batches, **recipe),
                       progress=False, **options)
        selection = folder / "selection.json"
        results[name] = {"batches": batches, "seconds": round(time.time() - started, 1),
                         "steps": result.trajectory.to_dict()["steps"], "plan": result.plan.to_dict(),
                         "selection": json.loads(selection.read_text())["rounds"] if selection.is_file() else None}
        if deadline.left() < 0:
            break
    return results


# -- run, prepare, report -----------------------------------------------------------------------------------------

STAGES = ("correctness", "latency", "prune")


def run(out: Path, device: str, budget: float, smoke: bool, stages: tuple[str, ...] = STAGES) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    deadline = Deadline(budget)
    record = {"date": time.strftime("%Y-%m-%d"), "device": device, "smoke": smoke, "budget_s": budget,
              "machine": machine()}
    path = out / "gpu_check.json"

    def write(partial=None):
        path.write_text(json.dumps(record if partial is None else {**record, "latency": partial}, indent=1,
                                   default=str))

    runners = {"correctness": lambda: correctness(device, smoke, Deadline(min(budget * 0.3, deadline.left()))),
               "latency": lambda: latency(device, smoke, Deadline(deadline.left() - (0.25 * budget)), write),
               "prune": lambda: prune_runs(device, smoke, deadline, Path(tempfile.mkdtemp(prefix="gpu-check-")))}
    for name, stage in ((name, runners[name]) for name in stages):
        started = time.time()
        try:
            record[name] = stage()
        except Exception as error:  # a stage that fails is recorded; the next one runs
            record[name] = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()[-3000:]}
        record[f"{name}_seconds"] = round(time.time() - started, 1)
        write()
    return record


def prepare() -> None:
    DATA.mkdir(exist_ok=True)
    for name in FASHION_FILES:
        shutil.copy(FASHION_MNIST_DIR / name, DATA / name)
    print(f"copied Fashion-MNIST into {DATA}; name it in the device call's carry: bench/gpu-data")


def report(folder: Path, results: Path = RESULTS) -> str:
    """The record in `folder` copied to `results`, with its tables in summary.md; returns the tables."""
    record = json.loads((folder / "gpu_check.json").read_text())
    results.mkdir(parents=True, exist_ok=True)
    if (folder / "gpu_check.json").resolve() != (results / "gpu_check.json").resolve():
        shutil.copy(folder / "gpu_check.json", results / "gpu_check.json")
    lines = [f"{record['date']}, {record['machine'].get('gpu', record['device'])}, torch {record['machine']['torch']}",
             "", "| check | ok | relative error (tolerance) |", "|---|---|---|"]
    for check in record.get("correctness", []):
        if isinstance(check, dict) and "check" in check:
            error = check.get("relative_error")
            detail = f"{error:.1e} ({check['tolerance']:.0e})" if error is not None else check.get(
                "error", check.get("skipped", ""))
            lines.append(f"| {check['check']} | {check.get('ok', '—')} | {detail} |")
    lines += ["", "| model | batch | precision | lowering | variant | ms | vs original | vs exact |",
              "|---|---|---|---|---|---|---|---|"]
    for row in record.get("latency", []):
        for name, value in row.get("variants", {}).items():
            lines.append(f"| {row['model']} | {row['batch']} | {row['precision']} | {row['lowering']} | {name} | "
                         f"{value['median_ms']:.3f} | {1 / value['vs_original']:.2f}× | "
                         f"{1 / value['vs_exact']:.2f}× |")
    for name, entry in record.get("prune", {}).items():
        if isinstance(entry, dict) and "steps" in entry:
            last = entry["steps"][-1]
            lines.append(f"\nprune {name}: {entry['batches']} batches, weight layers {last['dense_weight_layers']} -> "
                         f"{last['weight_layers']}, test {last['test']:.4f}, latency ratio {last.get('latency_ratio')}")
    text = "\n".join(lines) + "\n"
    (results / "summary.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["prepare", "run", "report"])
    parser.add_argument("folder", nargs="?", help="report: the folder holding gpu_check.json")
    parser.add_argument("--out", default="gpu-check-out")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for all stages")
    parser.add_argument("--smoke", action="store_true", help="small inputs, few repeats: checks the script")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare()
    elif args.command == "report":
        print(report(Path(args.folder)))
    else:
        run(Path(args.out), args.device, args.budget, args.smoke, tuple(args.stages.split(",")))


if __name__ == "__main__":
    main()
