"""Typed errors, each naming the option, node, pass or package at fault; and `NoMatch`, the reason a pass did
not rewrite a site."""
import math
from dataclasses import fields
from numbers import Real


class NoMatch(str):
    """Why a pattern did not match (reported as a skip, not raised); falsy so that `if not match:` reads
    naturally."""

    def __bool__(self) -> bool:
        return False


class FxCompressError(Exception):
    """Base class of every error fxcompress raises on purpose."""


class CaptureError(FxCompressError):
    """The model could not be captured as a graph."""


class OptionError(FxCompressError, ValueError):
    """A wrong option name, type or value."""


class PlanError(FxCompressError, ValueError):
    """A plan that does not fit the graph it is applied to."""


class PassError(FxCompressError):
    """An internal invariant broke inside a pass."""


class MissingDependencyError(FxCompressError, ImportError):
    """An optional dependency needed by the requested feature is not installed."""


def valid_choice(kind: str, value: object, choices) -> None:
    if value not in choices:
        raise OptionError(f"unknown {kind} {value!r}; valid: {', '.join(sorted(map(str, choices)))}")


def known_fields(kind: str, options: dict, cls) -> dict:
    """`options`, refused (OptionError naming the valid ones) where a key is not a field of dataclass `cls`."""
    valid = {field.name for field in fields(cls)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise OptionError(f"unknown {kind} option(s) {', '.join(map(repr, unknown))}; "
                          f"valid: {', '.join(sorted(valid))}")
    return options


def finite_number(what: str, value: object) -> float:
    """`value` as a float if it is a finite real number (not a bool); else an OptionError that `what` (e.g.
    "option 'alpha'") must be one."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise OptionError(f"{what} must be a finite number, got {value!r} ({type(value).__name__})")
    return float(value)
