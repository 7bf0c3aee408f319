"""What the bench scripts read of their committed results: trajectories, the step within tolerance, and a plan's
latency ratio against the dense model. One module, so that the scripts agree (a run's own folder is
`fxcompress.finetune.run_folder.RunFolder`)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

WITHIN = 0.01  # the goal: at most 1 point below the reference


def read_trajectory(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def within_one_point(steps: list[dict], key: str = "activations_linearised") -> dict:
    """The step furthest along `key` (the latest of equals) whose validation accuracy is at most 1 point below
    step 0's: chosen on validation, reported on test."""
    within = [step for step in steps if round(step["drop"], 12) <= WITHIN]
    return max(within, key=lambda step: (step.get(key, 0), step["step"]))


def latency_ratio(model: torch.nn.Module, plan, example: tuple, lowering: str, tokens: dict | None = None,
                  repeats: int = 30) -> float:
    """Latency of `model` compressed with `plan` (and `tokens`) over the dense `model`, interleaved."""
    from fxcompress import compress, measure
    compressed = compress(model, example, plan=plan, tokens=tokens, dynamic_batch=False).module
    timing = measure({"dense": model, "compressed": compressed}, example, lowering=lowering, repeats=repeats)
    return round(timing["results"]["compressed"]["ratio"], 4)


def lacoot_weight(settings: dict) -> float:
    """LaCoOT's lambda of a run's settings (`method_options`; runs recorded before it: `lacoot_weight`)."""
    return settings.get("method_options", {}).get("weight", settings.get("lacoot_weight"))
