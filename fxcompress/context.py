"""What a pass receives (`PassContext`: settings, the plan, the cost model, calibration data, where to report
refusals) and what a rewrite pass gives back (`Site`: one rewrite, found but not yet applied).

The contract is written down in `passes/README.md`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from .config import CompressConfig
from .cost import CostModel
from .errors import OptionError
from .plan import Plan
from .progress import bar
from .report import Skip


PASS_LABELS = {"annotate_entropy": "activation states", "annotate_block_distance": "block distances"}


class Calibration:
    """Calibration batches for the analysis passes, streamed one at a time.

    Each batch is a tensor or a tuple whose first elements are the graph's inputs (a DataLoader's
    (images, labels) works: extra elements are dropped). A list or DataLoader can be read by several
    passes; a one-shot iterator (a generator) only once. Given the `example` inputs, each batch must match
    them in type, dtype and every dimension but the first (the batch size may differ).
    """

    def __init__(self, batches: Iterable, progress: bool = False, example: tuple | None = None):
        if isinstance(batches, torch.Tensor) or not isinstance(batches, Iterable):
            raise OptionError("calibration must be an iterable of batches (a list or DataLoader), "
                              f"got {type(batches).__name__}")
        self.batches, self.progress, self.example, self._used = batches, progress, example, False

    def _check(self, index: int, batch: tuple) -> None:
        for position, (value, example) in enumerate(zip(batch, self.example or ())):
            if not isinstance(example, torch.Tensor):
                continue
            expected = f"({', '.join(['N', *map(str, example.shape[1:])])}) {_dtype(example)} like the example"
            if not isinstance(value, torch.Tensor):
                raise OptionError(f"calibration batch {index}: input {position} is a {type(value).__name__}; "
                                  f"expected a tensor {expected}")
            if value.dim() != example.dim() or value.shape[1:] != example.shape[1:] or value.dtype != example.dtype:
                raise OptionError(f"calibration batch {index}: input {position} has shape "
                                  f"({', '.join(map(str, value.shape))}) {_dtype(value)}; expected {expected}")

    def inputs(self, count: int, description: str = "", label: str = "calibration batches") -> Iterator[tuple]:
        """Each batch as a tuple of `count` graph inputs, with a progress bar if asked for."""
        if self._used and iter(self.batches) is self.batches:
            raise OptionError("calibration data was a one-shot iterator and is used up; pass a list or DataLoader")
        self._used = True
        batches = bar(self.batches, label, self.progress)
        empty = True
        for index, batch in enumerate(batches):
            batch = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)
            if len(batch) < count:
                raise OptionError(f"a calibration batch holds {len(batch)} tensors; the graph takes {count} inputs")
            self._check(index, batch[:count])
            empty = False
            yield batch[:count]
        if empty:
            raise OptionError(f"calibration data is empty: {description or 'the analysis'} needs at least one batch")


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Site:
    """One rewrite a pass proposes, found without changing the graph; the pipeline calls `apply()` or not.

    `node` identifies the rewrite across runs of the pass on copies of one graph: a rewrite that breaks the
    outputs is excluded by it. `sources` (default: `node` alone) are the nodes it replaces, for the report;
    `macs` and `latency` are (before, after) of the ops it replaces (`cost.merge_costs`)."""

    node: str
    apply: Callable[[], None]
    sources: tuple[str, ...] = ()
    exact: bool = True
    detail: str = ""
    macs: tuple[int, int] = (0, 0)
    latency: tuple[float, float] | tuple[None, None] = (None, None)


@dataclass
class PassContext:
    config: CompressConfig
    pass_name: str = ""
    plan: Plan = field(default_factory=Plan)
    cost: CostModel = field(default_factory=CostModel)
    skips: list[Skip] = field(default_factory=list)
    calibration: Calibration | None = None  # data for the analysis passes

    def calibration_inputs(self, count: int):
        if self.calibration is None:
            raise OptionError(f"pass {self.pass_name!r} needs calibration data (calibration=[batch, ...])")
        label = f"calibration: {PASS_LABELS.get(self.pass_name, self.pass_name)}"
        return self.calibration.inputs(count, self.pass_name, label)

    def skip(self, node: str, reason: str) -> None:
        self.skips.append(Skip(self.pass_name, node, reason))
