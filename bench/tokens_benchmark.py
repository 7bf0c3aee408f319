"""Accuracy and CPU throughput vs tokens removed: FOLDER, ToMe schedule, pooling and random drop.

On the Fashion-MNIST ViT of `fashion_vit.py` (50 tokens: CLS + 7 x 7 patches, 6 layers), trained by
`train_fashion_vit.py`. For each fraction of patch tokens removed, every method keeps the same number of
tokens after its last reducing layer:
- folder@L: FOLDER matching on keys (with folding rounds), proportional attention, all in layer L;
- tome: the same matching spread over all 6 layers (r tokens per layer), proportional attention;
- pool@L / drop@L: grid average pooling (square grids only) / uniform random drop in layer L.
Accuracy on the Fashion-MNIST test set; throughput of the whole model (eager) at batch 32 and batch 1,
all candidates of one fraction timed interleaved with the untouched model, medians reported. Writes
bench/results/tokens.json and tokens.md.

    .venv/bin/python bench/tokens_benchmark.py [--images 10000] [--repeats 30] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fashion_vit import accuracy, images, load
from fxcompress import reduce_tokens
from fxcompress.measure import machine, measure_latency

RESULTS = Path(__file__).parent / "results"
RATIOS = (0.25, 0.5, 0.66, 0.75)
EARLY, LATE = 1, 3


def candidates(ratio: float) -> dict[str, dict]:
    return {
        f"folder@{EARLY}": {"method": "folder", "layers": [EARLY], "ratio": ratio, "proportional_attention": True},
        f"folder@{LATE}": {"method": "folder", "layers": [LATE], "ratio": ratio, "proportional_attention": True},
        "tome": {"method": "tome", "ratio": ratio, "proportional_attention": True},
        f"pool@{EARLY}": {"method": "pool", "layers": [EARLY], "ratio": ratio},
        f"drop@{EARLY}": {"method": "drop", "layers": [EARLY], "ratio": ratio},
    }


def ablation() -> dict[str, dict]:
    """FOLDER variants at 66% removed in layer EARLY: the alpha penalty, proportional attention, order."""
    base = {"method": "folder", "layers": [EARLY], "ratio": 0.66}
    return {"folder plain": base, "folder +prop": {**base, "proportional_attention": True},
            "folder +prop +alpha 1": {**base, "proportional_attention": True, "alpha": 1.0},
            "folder +prop +restore order": {**base, "proportional_attention": True, "restore_order": True}}


def tokens_left(model: torch.nn.Module) -> int:
    counts = []
    hook = model.encoder.ln.register_forward_hook(lambda m, i, o: counts.append(o.shape[1]))
    with torch.no_grad():
        model(torch.zeros(1, 1, 28, 28))
    hook.remove()
    return counts[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load()
    x, y = images("test")
    x, y = x[:args.images], y[:args.images]
    base_accuracy = accuracy(model, x, y)
    rows = [{"method": "original", "options": {}, "removed": 0.0, "tokens": tokens_left(model),
             "accuracy": base_accuracy}]
    timing_groups = {}
    for ratio in RATIOS:
        group = {}
        for name, options in candidates(ratio).items():
            reduced = reduce_tokens(model, options)
            torch.manual_seed(0)  # random drop
            rows.append({"method": name, "options": options, "removed": ratio, "tokens": tokens_left(reduced),
                         "accuracy": accuracy(reduced, x, y)})
            group[name] = reduced
            print(rows[-1], flush=True)
        timing_groups[ratio] = group
    for name, options in ablation().items():
        rows.append({"method": name, "options": options, "removed": 0.66, "tokens": tokens_left(
            reduce_tokens(model, options)), "accuracy": accuracy(reduce_tokens(model, options), x, y),
            "ablation": True})
        print(rows[-1], flush=True)
    for batch in (32, 1):
        inputs = (x[:batch],)
        base = None
        for ratio, group in timing_groups.items():
            timed = measure_latency({"original": model, **group}, inputs, repeats=args.repeats)
            base = base or timed["original"]
            for row in rows:
                if row["removed"] == ratio and row["method"] in timed and not row.get("ablation"):
                    result = timed[row["method"]]
                    row[f"images_per_s_b{batch}"] = batch * 1e3 / result["median_ms"]
                    row[f"speedup_b{batch}"] = 1 / result["ratio"]
                    row[f"iqr_ms_b{batch}"] = [result["q1_ms"], result["q3_ms"]]
            rows[0].setdefault(f"images_per_s_b{batch}", []).append(batch * 1e3 / timed["original"]["median_ms"])
        print(f"batch {batch} timed", flush=True)
    for batch in (32, 1):
        rows[0][f"images_per_s_b{batch}"] = sorted(rows[0][f"images_per_s_b{batch}"])[len(RATIOS) // 2]
        rows[0][f"speedup_b{batch}"] = 1.0
    record = {"rows": rows, "test_images": len(x), "baseline_accuracy": base_accuracy, "repeats": args.repeats,
              "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tokens.json").write_text(json.dumps(record, indent=2))
    (RESULTS / "tokens.md").write_text(table(record))
    print(table(record))


def table(record: dict) -> str:
    base = record["baseline_accuracy"]
    lines = [f"Fashion-MNIST ViT (50 tokens, 6 layers), {record['test_images']} test images, "
             f"{record['machine']['threads']} threads, eager, medians of {record['repeats']} interleaved runs "
             f"({record['date']}).", "",
             "| method | removed | tokens left | accuracy | Δ acc (pt) | img/s b32 | speedup b32 | img/s b1 | speedup b1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in record["rows"]:
        def cell(key, fmt):
            return format(row[key], fmt) if key in row else "-"
        lines.append(f"| {row['method']} | {row['removed']:.0%} | {row['tokens']} | {row['accuracy']:.4f} | "
                     f"{100 * (row['accuracy'] - base):+.2f} | {cell('images_per_s_b32', '.0f')} | "
                     f"{cell('speedup_b32', '.2f')} | {cell('images_per_s_b1', '.0f')} | {cell('speedup_b1', '.2f')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
