"""A plan: serialisable decisions keyed by stable node names, found once and applied again anywhere.

Which actions exist, what each may target and how its params are checked is not known here: each action is a
`PlanAction` defined beside its pass and collected in `passes.PLAN_ACTIONS`; `pipeline.check_plan` checks a
plan against a graph with them before any pass runs. This module stays free of FX.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import PlanError

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Decision:
    action: str  # the name of a `PlanAction`
    target: str  # stable node name, "<module path>:<op>[#k]": an activation, or a residual add for remove_block
    params: dict[str, Any] = field(default_factory=dict)  # remove/zero_channels: {"channels": [int, ...]}

    def __post_init__(self) -> None:
        if not isinstance(self.action, str) or not self.action:
            raise PlanError(f"plan action must be a name, got {self.action!r}")
        if not isinstance(self.target, str) or not self.target:
            raise PlanError(f"plan decision needs a target node name, got {self.target!r}")
        if not isinstance(self.params, dict) or not all(isinstance(key, str) for key in self.params):
            raise PlanError(f"{self.action} at {self.target}: params must be a dict with string keys, "
                            f"got {self.params!r}")

    def error(self, message: str) -> PlanError:
        return PlanError(f"{self.action} at {self.target}: {message}")


@dataclass(frozen=True)
class PlanAction:
    """One plan action, defined beside the pass that applies it; `passes.PLAN_ACTIONS` holds them in the
    order they run. `apply` is the pass, registered under the action's name; `targets(gm)` lists the stable
    names the action may target in a graph; `validate(decision, node)` checks a decision's params against its
    target node (annotated with names and shapes) and raises `decision.error(...)`."""

    name: str
    apply: Callable
    targets: Callable
    validate: Callable


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_param_names(decision: Decision, names: tuple[str, ...]) -> None:
    """Refuse params other than `names` and any of them missing."""
    if not names and decision.params:
        raise decision.error(f"takes no params, got {decision.params!r}")
    unknown = sorted(set(decision.params) - set(names))
    if unknown:
        raise decision.error(f"unknown param(s) {', '.join(map(repr, unknown))}; valid: {', '.join(names)}")
    missing = [name for name in names if name not in decision.params]
    if missing:
        raise decision.error(f"params need {', '.join(map(repr, missing))}")


def takes_no_params(decision: Decision, node) -> None:
    check_param_names(decision, ())


def check_channels(decision: Decision, width: int | None) -> None:
    """`{"channels": [c, ...]}`: a non-empty list of distinct ints in 0..width-1 (`width`: the size of the
    target's channel axis, None where it has none)."""
    check_param_names(decision, ("channels",))
    channels = decision.params["channels"]
    if not isinstance(channels, list) or not channels or not all(map(is_int, channels)):
        raise decision.error(f"'channels' must be a non-empty list of ints, got {channels!r}")
    if width is None:
        raise decision.error("the target has no channel axis")
    outside = [c for c in channels if not 0 <= c < width]
    if outside:
        raise decision.error(f"channels {outside} out of range; the target has {width} channels "
                             f"(valid 0..{width - 1})")
    repeated = sorted({c for c in channels if channels.count(c) > 1})
    if repeated:
        raise decision.error(f"channel {repeated[0]} listed twice")


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
            return cls.from_json(_read_plan_file(Path(source)))
        raise PlanError(f"a plan must be a Plan, dict, JSON string or path, got {type(source).__name__}")


def _read_plan_file(path: Path) -> str:
    """The text of a plan file, UTF-8 with or without a byte-order mark."""
    try:
        if not path.is_file():
            raise PlanError(f"plan file not found: {path}")
        data = path.read_bytes()
    except OSError as error:
        raise PlanError(f"cannot read plan file {path}: {error.strerror or error}") from error
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise PlanError(f"plan file {path} is not UTF-8 text (a JSON plan expected): {error}") from error
