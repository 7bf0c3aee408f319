"""LaCoOT (Layer Collapse through Optimal Transport): train with a block-distance penalty, then drop whole blocks.

Training minimises CE + weight * the mean, over the monitored residual blocks, of the max-sliced Wasserstein
distance between each block's input and output (`criteria.block_distance`: POT, each sample flattened, the batch
as the empirical distribution, p = 2). The published weights are 5 (ResNet-18) and 9 (MobileNetV2). A block is
a module's chain of residual adds with identity shortcuts in the captured graph (`monitored_blocks`): one add in
a ResNet or MobileNetV2 block, two in a transformer layer (attention, then MLP), so a transformer layer is
regularised and removed whole. The block's input (the first add's shortcut) and output (the last add's result)
are read from the trainable planned model at its call sites (`trainable.recording`), so no architecture needs its
own hooks. After training, blocks are replaced by their input (`remove_block` of each of their adds), smallest
distance first, the distances measured on calibration batches in eval mode (`block_distances`), without
fine-tuning in the paper.

Differences from the published code, which hooks the block modules: the output read here is the add's result,
before any activation that follows it (torchvision's BasicBlock applies a ReLU after its add): the tensor that
`remove_block` replaces by the block input.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from ..blocks import monitored_blocks
from ..capture import is_planned
from ..criteria import block_distance
from ..errors import OptionError, PlanError, finite_number
from ..plan import Plan
from ..trainable import EvalMode, apply_plan, planned_graph, recording

CALIBRATION_SEED = 0  # the projections of `block_distances`: the same for every batch and every call


def block_pairs(recorded: list, blocks: dict[str, tuple[str, ...]]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(block, input, output) of each block forward in `recorded` (`trainable.recording` of the first and last adds
    of `blocks`): the first add's shortcut and the last add's result."""
    starts = {adds[0]: block for block, adds in blocks.items()}
    ends = {adds[-1]: block for block, adds in blocks.items()}
    inputs, pairs = {}, []
    for name, shortcut, result in recorded:
        if name in starts:
            inputs[starts[name]] = shortcut
        if name in ends:
            pairs.append((ends[name], inputs.pop(ends[name]), result))
    return pairs


def recorded_adds(blocks: dict[str, tuple[str, ...]]) -> set[str]:
    return {name for adds in blocks.values() for name in (adds[0], adds[-1])}


def positive_integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionError(f"LaCoOT option {name!r} must be an integer >= 1, got {value!r}")
    return value


def planned_model(model: torch.nn.Module, example_inputs) -> torch.nn.Module:
    return model if is_planned(model) else apply_plan(model, Plan(), example_inputs)


class BlockDistanceRegulariser:
    """The LaCoOT penalty for `trainer.train(..., regulariser=)`: weight * the mean over the block forwards
    recorded since the last call of the block distances of the monitored blocks (`blocks`: name -> adds, default
    `monitored_blocks` of the model's planned graph). The projections are drawn afresh for each block and batch,
    from seeds drawn from torch's global RNG (`train` seeds it, so runs repeat); POT's generator makes them. The
    penalty is computed in float32. `model` must be planned (`apply_plan`); weight 0 is refused (train without a
    regulariser)."""

    def __init__(self, model: torch.nn.Module, example_inputs, weight: float, projections: int = 50,
                 blocks: dict[str, tuple[str, ...]] | None = None):
        if not is_planned(model):
            raise PlanError("the LaCoOT regulariser needs a planned model (made by apply_plan)")
        if not finite_number("LaCoOT weight", weight) > 0:
            raise OptionError(f"LaCoOT weight must be > 0 (0 is training without the regulariser), got {weight!r}")
        self.weight, self.projections = float(weight), positive_integer("projections", projections)
        self.blocks = monitored_blocks(planned_graph(model, example_inputs)) if blocks is None else dict(blocks)
        if not self.blocks:
            raise OptionError("the model has no residual block with an identity shortcut for LaCoOT to regularise")
        self.recorded: list | None = None

    @contextmanager
    def watching(self, model: torch.nn.Module) -> Iterator["BlockDistanceRegulariser"]:
        """Record the monitored blocks of `model` (the planned model itself, not a DDP wrapper) while open."""
        with recording(model, recorded_adds(self.blocks)) as recorded:
            self.recorded = recorded
            try:
                yield self
            finally:
                self.recorded = None

    def penalty(self) -> torch.Tensor:
        """The penalty of the forwards since the last call; consumes their records."""
        if self.recorded is None:
            raise OptionError("penalty() is called inside watching(model), after a forward of the model")
        if not self.recorded:
            raise PlanError("no block was recorded: penalty() must follow a forward of the watched model")
        distances = [block_distance(x.float(), y.float(), self.projections, seed=_draw_seed())
                     for _, x, y in block_pairs(self.recorded, self.blocks)]
        self.recorded.clear()
        return self.weight * torch.stack(distances).mean()


def _draw_seed() -> int:
    return int(torch.randint(2 ** 31 - 1, ()))


def block_distances(model: torch.nn.Module, example_inputs, batches, projections: int = 50) -> dict[str, float]:
    """The mean block distance of each monitored block of `model` (planned or not) over `batches` (input tuples
    or tensors), in eval mode without gradients, with fixed projections (CALIBRATION_SEED)."""
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    planned = planned_model(model, example_inputs)
    return measured_distances(planned, monitored_blocks(planned_graph(planned, example_inputs)), batches, projections)


def measured_distances(model: torch.nn.Module, blocks: dict[str, tuple[str, ...]], batches,
                       projections: int) -> dict[str, float]:
    if not blocks:
        return {}
    device = next(model.parameters()).device
    totals = {name: [] for name in blocks}
    with EvalMode(model), torch.no_grad(), recording(model, recorded_adds(blocks)) as recorded:
        for batch in batches:
            batch = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)
            model(*(tensor.to(device) for tensor in batch))
            for name, x, y in block_pairs(recorded, blocks):
                totals[name].append(float(block_distance(x.float(), y.float(), projections, seed=CALIBRATION_SEED)))
            recorded.clear()
    if not next(iter(totals.values())):
        raise OptionError("block distances need at least one calibration batch")
    means = {name: sum(values) / len(values) for name, values in totals.items()}
    for name, mean in means.items():
        finite_number(f"the block distance of {name!r} on the calibration batches", mean)
    return means
