"""Prefill latency of a small, randomly initialised LLaVA-style model vs visual tokens kept (CPU).

transformers' `LlavaForConditionalGeneration` built from a config: a CLIP vision tower with LLaVA-1.5's
geometry (336 x 336 images, patches of 14: 576 patch tokens + CLS) but 6 layers of width 384, the
two-layer GELU projector, and a 6-layer Llama decoder of width 768. The LLM reads the tower's
penultimate layer (vision_feature_layer = -2) without its CLS, so FOLDER merges in that layer
(`layers=[-2]`), keeping 100%, 50%, 33% or 25% of the 576 visual tokens. Prefill = one forward of
[20 text tokens, visual tokens, 40 text tokens] with logits for the last position only, batch 1, all
settings timed interleaved, medians. Random weights: this measures speed only, never quality.
Writes bench/results/llava_prefill.json and llava_prefill.md.

    .venv/bin/python bench/llava_prefill.py [--repeats 7] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from fxcompress import reduce_tokens
from fxcompress.measure import machine, measure_latency

RESULTS = Path(__file__).parent / "results"
IMAGE_TOKEN = 32000
PATCHES = 576
KEEP = (1.0, 1 / 2, 1 / 3, 1 / 4)


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                              image_size=336, patch_size=14)
    text = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12,
                       num_key_value_heads=12, vocab_size=32064)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(config).eval()


def prompt(visual: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.cat([torch.randint(0, IMAGE_TOKEN, (1, 20), generator=generator),
                      torch.full((1, visual), IMAGE_TOKEN),
                      torch.randint(0, IMAGE_TOKEN, (1, 40), generator=generator)], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build()
    pixels = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(1))
    runners, towers, settings = {}, {}, {}
    for keep in KEEP:
        visual = round(keep * PATCHES)
        reduced = model if keep == 1.0 else reduce_tokens(model, layers=[-2], tokens=visual + 1)
        ids = prompt(visual)
        name = f"{keep:.0%}"
        settings[name] = {"keep": keep, "visual_tokens": visual, "sequence": ids.shape[1]}
        runners[name] = lambda p, m=reduced, i=ids: m(input_ids=i, pixel_values=p, logits_to_keep=1)
        towers[name] = lambda p, m=reduced: m.model.get_image_features(pixel_values=p)
    prefill = measure_latency(runners, (pixels,), warmup=1, repeats=args.repeats)
    tower = measure_latency(towers, (pixels,), warmup=1, repeats=args.repeats)
    rows = [{**settings[name], "prefill_ms": prefill[name]["median_ms"], "prefill_speedup": 1 / prefill[name]["ratio"],
             "prefill_iqr_ms": [prefill[name]["q1_ms"], prefill[name]["q3_ms"]],
             "vision_ms": tower[name]["median_ms"]} for name in runners]
    record = {"rows": rows, "repeats": args.repeats, "params_millions": sum(p.numel() for p in model.parameters()) / 1e6,
              "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "note": "random weights: speed only, no quality can be measured"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "llava_prefill.json").write_text(json.dumps(record, indent=2))
    (RESULTS / "llava_prefill.md").write_text(table(record))
    print(table(record))


def table(record: dict) -> str:
    lines = [f"LLaVA-style model, random weights ({record['params_millions']:.0f}M parameters), batch 1, "
             f"{record['machine']['threads']} threads, medians of {record['repeats']} interleaved runs "
             f"({record['date']}). Speed only: no quality can be measured without trained weights.", "",
             "| visual tokens kept | sequence | prefill ms | speedup | vision tower + projector ms |",
             "|---|---|---|---|---|"]
    for row in record["rows"]:
        lines.append(f"| {row['visual_tokens']} ({row['keep']:.0%}) | {row['sequence']} | {row['prefill_ms']:.0f} | "
                     f"{row['prefill_speedup']:.2f} | {row['vision_ms']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
