"""A plan: serialisable decisions keyed by stable node names, found once and applied again anywhere."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import PlanError

ACTIONS = ("linearize", "remove_channels", "zero_channels", "remove_block", "merge_tokens")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Decision:
    action: str  # one of ACTIONS
    target: str  # stable node name, "<module path>:<op>[#k]": an activation, or a residual add for remove_block
    params: dict[str, Any] = field(default_factory=dict)  # remove/zero_channels: {"channels": [int, ...]}

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise PlanError(f"unknown plan action {self.action!r}; valid: {', '.join(ACTIONS)}")
        if not isinstance(self.target, str) or not self.target:
            raise PlanError(f"plan decision needs a target node name, got {self.target!r}")


@dataclass(frozen=True)
class Plan:
    decisions: tuple[Decision, ...] = ()
    model: str = ""  # what the plan was found on, for messages

    @classmethod
    def linearize(cls, targets, model: str = "") -> "Plan":
        return cls(tuple(Decision("linearize", target) for target in targets), model)

    def targets(self, action: str) -> list[str]:
        return [decision.target for decision in self.decisions if decision.action == action]

    def to_dict(self) -> dict:
        return {"format": FORMAT_VERSION, "model": self.model,
                "decisions": [asdict(decision) for decision in self.decisions]}

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
            raise PlanError(f"not an fxcompress plan (format {FORMAT_VERSION} expected)")
        try:
            decisions = tuple(Decision(**item) for item in data["decisions"])
        except (KeyError, TypeError) as error:
            raise PlanError(f"malformed plan decision: {error}") from error
        return cls(decisions, data.get("model", ""))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as error:
            raise PlanError(f"plan is not valid JSON: {error}") from error

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, source: "Plan | str | Path | dict | None") -> "Plan":
        """Accept a Plan, a dict, a JSON string or a path to a JSON file."""
        if source is None:
            return cls()
        if isinstance(source, Plan):
            return source
        if isinstance(source, dict):
            return cls.from_dict(source)
        if isinstance(source, (str, Path)):
            text = str(source)
            if text.lstrip().startswith("{"):
                return cls.from_json(text)
            path = Path(source)
            if not path.is_file():
                raise PlanError(f"plan file not found: {path}")
            return cls.from_json(path.read_text())
        raise PlanError(f"a plan must be a Plan, dict, JSON string or path, got {type(source).__name__}")
