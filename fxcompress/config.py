"""Settings of a compression run, validated once where they enter."""
from __future__ import annotations

from dataclasses import dataclass, fields

from .errors import OptionError, finite_number, valid_choice


@dataclass(frozen=True)
class CompressConfig:
    """How far the rewriting passes may go.

    allow_approximate: apply conv-conv merges that are exact only away from the border ring
        (first kernel > 1 and second padding > 0); each is listed in the report.
    force: merge even where the cost model (MACs and parameters) says the result is more expensive.
    allow_bias_map: allow exact merges that need an input-independent bias map (a 1x1 conv followed by a
        padded conv); the map fixes the model to the captured resolution. Off under dynamic shapes.
    max_kernel_size: largest merged kernel side; bounds the growth k1 + (k2 - 1) * s1 of merged chains.
    cost_model: what a merge must not increase besides parameters: "macs", or "latency" measured per op on
        `latency_lowering` ("eager", "inductor", "onnxruntime").
    tolerance: largest relative output change (max |delta| / max |ref|) an exact rewrite may cause
        before it is rolled back; at least 8 machine epsilons for float16 and bfloat16 graphs.
    """

    allow_approximate: bool = False
    force: bool = False
    allow_bias_map: bool = True
    max_kernel_size: int = 7
    tolerance: float = 1e-4
    cost_model: str = "macs"
    latency_lowering: str = "eager"

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            expected = {"bool": bool, "int": int, "float": (int, float), "str": str}[field.type]
            if not isinstance(value, expected) or (field.type != "bool" and isinstance(value, bool)):
                raise OptionError(f"option {field.name!r} must be {field.type}, got {value!r}")
            if field.type == "float":
                finite_number(f"option {field.name!r}", value)
        if self.max_kernel_size < 1:
            raise OptionError(f"option 'max_kernel_size' must be >= 1, got {self.max_kernel_size}")
        valid_choice("cost_model", self.cost_model, ("macs", "latency"))
        valid_choice("latency_lowering", self.latency_lowering, ("eager", "inductor", "onnxruntime"))
        if not 0 < self.tolerance < 1:
            raise OptionError(f"option 'tolerance' must be in (0, 1), got {self.tolerance}")

    @classmethod
    def from_options(cls, options: dict) -> "CompressConfig":
        unknown = sorted(set(options) - cls.option_names())
        if unknown:
            raise OptionError(f"unknown option(s) {', '.join(map(repr, unknown))}; "
                              f"valid: {', '.join(sorted(cls.option_names()))}")
        return cls(**options)

    @classmethod
    def option_names(cls) -> set[str]:
        return {field.name for field in fields(cls)}
