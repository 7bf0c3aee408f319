"""Numerical verification: run a graph on sample inputs and compare its outputs with a reference."""
from __future__ import annotations

import torch
from torch import fx
from torch.utils import _pytree as pytree


def sample_inputs(example_inputs) -> list[tuple]:
    """The caller's example inputs plus a seeded random variant of their floating-point tensors
    (scalars stay: dynamo passes options such as a dropout probability as 0-d tensors)."""
    generator = torch.Generator().manual_seed(0)

    def randomise(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() > 1:
            noise = torch.randn(value.shape, generator=generator, dtype=torch.float32)
            return (value.float().std().clamp(min=1e-3) * noise + value.float().mean()).to(value.dtype)
        return value

    return [tuple(example_inputs), tuple(pytree.tree_map(randomise, tuple(example_inputs)))]


@torch.no_grad()
def outputs(gm: fx.GraphModule, samples: list[tuple]) -> list[torch.Tensor]:
    tensors = []
    for args in samples:
        result = gm(*args)
        tensors += [t.detach().float() for t in pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]
    return tensors


def relative_error(reference: list[torch.Tensor], actual: list[torch.Tensor]) -> float:
    """max |actual - reference| / max |reference| over all outputs (inf on a shape mismatch)."""
    if len(reference) != len(actual) or any(r.shape != a.shape for r, a in zip(reference, actual)):
        return float("inf")
    worst = 0.0
    for ref, out in zip(reference, actual):
        if ref.numel() == 0:
            continue
        scale = ref.abs().max().item() or 1.0
        error = (out - ref).abs().max().item() / scale
        worst = max(worst, error if error == error else float("inf"))
    return worst
