"""What watches the fine-tuning loop: after each step (`on_step`, with the step's record) and at its end (`on_end`,
with the whole trajectory). Hooks only read; the loop calls them on rank 0.

- `StepLine`: one line per step (what `progress=True` prints);
- `CsvLog(path)`: one row per step and one per training epoch (`kind` step | epoch), appended, so a resumed run
  continues its file;
- `TensorBoardLog(folder)`: the same as TensorBoard scalars (needs the `tensorboard` package);
- any object with these two methods, passed as `prune(..., hooks=[...])`.
A step's record holds its training epochs (`epochs`: loss and learning rate of each) beside its scores and costs.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Protocol

from ..errors import MissingDependencyError
from ..measure import speedup

STEP_FIELDS = ("step", "validation", "test", "drop", "activations_linearised", "blocks_removed", "sparsity",
               "weight_layers", "macs_ratio", "latency_ratio", "seconds")


class Hook(Protocol):
    def on_step(self, entry: dict) -> None: ...

    def on_end(self, trajectory) -> None: ...


class StepLine:
    def on_step(self, entry: dict) -> None:
        removed = f"{entry['blocks_removed']} blocks removed, " if entry.get("blocks_removed") else ""
        sparsity = f"sparsity {entry['sparsity']:.3f}, " if entry.get("sparsity") else ""
        test = entry["test"] if entry["test"] is None else round(entry["test"], 4)
        latency = f", latency {entry['latency_ratio']:.3f} of the dense model's ({speedup(entry['latency_ratio'])})" \
            if "latency_ratio" in entry else ""
        loss = f", training loss {entry['epochs'][-1]['loss']:.4f}" if entry.get("epochs") else ""
        print(f"step {entry['step']}: {entry.get('activations_linearised', 0)} activations linearised, {removed}"
              f"{sparsity}weight layers {entry.get('weight_layers')}, validation {entry['validation']:.4f} "
              f"(drop {entry['drop']:+.4f}), test {test}{latency}{loss}", flush=True)

    def on_end(self, trajectory) -> None:
        pass


class CsvLog:
    FIELDS = ("kind", *STEP_FIELDS, "epoch", "loss", "lr")

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_step(self, entry: dict) -> None:
        new = not self.path.is_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, self.FIELDS, extrasaction="ignore")
            if new:
                writer.writeheader()
            for epoch in entry.get("epochs", []):
                writer.writerow({"kind": "epoch", "step": entry["step"], **epoch})
            writer.writerow({"kind": "step", **entry})

    def on_end(self, trajectory) -> None:
        pass


class TensorBoardLog:
    def __init__(self, folder: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise MissingDependencyError("the TensorBoard log needs the tensorboard package: pip install "
                                         "tensorboard") from error
        self.writer = SummaryWriter(str(folder))

    def on_step(self, entry: dict) -> None:
        for epoch in entry.get("epochs", []):
            self.writer.add_scalar("train/loss", epoch["loss"], epoch["epoch"])
            self.writer.add_scalar("train/lr", epoch["lr"], epoch["epoch"])
        for field in STEP_FIELDS[1:]:
            if isinstance(entry.get(field), (int, float)):
                self.writer.add_scalar(f"step/{field}", entry[field], entry["step"])
        self.writer.flush()

    def on_end(self, trajectory) -> None:
        self.writer.close()
