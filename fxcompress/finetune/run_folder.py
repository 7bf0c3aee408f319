"""A run's folder: the one owner of the files the fine-tuning loop writes, and of reading them back.

  checkpoint.pt     what resume needs: the current model's plan, plain weights and pruning masks, the dense
                    model's weights, the RNG states, the trajectory and, with `rewind`, the initial weights
  kept.pt           the last step within the tolerance: the planned model itself (`kept_model()`, or
                    `torch.load(path, weights_only=False)`: its class must be importable, its plan is applied again)
  steps/<step>.pt   with `save_steps`, every step's planned model, as kept.pt (`step_model(step)`)
  trajectory.json   the record of every step (`loop.Trajectory`)
  plan.json         the kept step's plan, for the compiler and build steps (written by the command line)

Writes are atomic (a temporary file renamed over the old one), so a run killed mid-write leaves the previous file
whole. Everything is read onto the CPU, so a run made on a GPU loads on a machine without one.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch

from ..plan import Decision, Plan

FILES = ("checkpoint.pt", "kept.pt", "trajectory.json", "plan.json")


def plan_until(steps: list[dict], step: int) -> Plan:
    """The plan of a run after `step`: the decisions of its steps 1..step (`steps` as the trajectory records
    them)."""
    return Plan(tuple(Decision(**decision) for entry in steps[1:step + 1] for decision in entry["decisions"]))


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def holds_run(self) -> bool:
        return (self.path / "checkpoint.pt").is_file()

    def files(self) -> list[str]:
        """The names of what the folder holds, sorted (an empty list for a missing folder)."""
        return sorted(path.name for path in self.path.iterdir()) if self.path.is_dir() else []

    def clear(self) -> None:
        """Delete the files of a run (what `FILES` names, and the saved steps); anything else stays."""
        for name in FILES:
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.path / "steps", ignore_errors=True)

    def _write(self, name: str, write: Callable[[Path], None]) -> None:
        path = self.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        write(temporary)
        temporary.replace(path)

    def _read(self, name: str):
        path = self.path / name
        return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None

    def save_checkpoint(self, state: dict) -> None:
        self._write("checkpoint.pt", lambda path: torch.save(state, path))

    def checkpoint(self) -> dict | None:
        return self._read("checkpoint.pt")

    def save_model(self, model: torch.nn.Module, step: int | None = None) -> None:
        """The planned `model` as kept.pt, or as steps/<step>.pt."""
        self._write("kept.pt" if step is None else f"steps/{step}.pt", lambda path: torch.save(model, path))

    def kept_model(self) -> torch.nn.Module | None:
        return self._read("kept.pt")

    def step_model(self, step: int) -> torch.nn.Module:
        model = self._read(f"steps/{step}.pt")
        if model is None:
            raise FileNotFoundError(f"{self.path} holds no steps/{step}.pt (save_steps keeps every step)")
        return model

    def save_trajectory(self, trajectory: dict) -> None:
        self._write("trajectory.json", lambda path: path.write_text(json.dumps(trajectory, indent=2)))

    def trajectory(self) -> dict | None:
        path = self.path / "trajectory.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def plan_at(self, step: int) -> Plan:
        trajectory = self.trajectory()
        if trajectory is None:
            raise FileNotFoundError(f"{self.path} holds no trajectory.json")
        return plan_until(trajectory["steps"], step)

    def save_plan(self, plan: Plan) -> None:
        self._write("plan.json", lambda path: plan.save(path))
