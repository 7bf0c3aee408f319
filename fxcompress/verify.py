"""Numerical verification: run a graph on sample inputs and compare its outputs with a reference, in full float32
precision (`full_precision`: no TF32 on a GPU).

Every run gets fresh copies of the samples (`fresh`): a model may edit its inputs in place (`x.sub_(0.5)`),
and a second run on edited samples would differ from the first for a correct graph."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import fx
from torch.utils import _pytree as pytree

LOW_PRECISION_EPS = 8


def sample_inputs(example_inputs) -> list[tuple]:
    """The caller's example inputs and `random_sample` of them."""
    return [tuple(example_inputs), random_sample(example_inputs)]


def random_sample(example_inputs) -> tuple:
    """A seeded random variant of the example inputs' floating-point tensors (the example's mean and spread), on
    their devices; other values stay (scalars too: dynamo passes options such as a dropout probability as 0-d
    tensors). The noise is drawn on the CPU, so that the sample is the same on every device."""
    generator = torch.Generator().manual_seed(0)

    def randomise(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() > 1:
            noise = torch.randn(value.shape, generator=generator, dtype=torch.float32)
            noise = noise.to(value.device)
            return (value.float().std().clamp(min=1e-3) * noise + value.float().mean()).to(value.dtype)
        return value

    return tuple(pytree.tree_map(randomise, tuple(example_inputs)))


@contextmanager
def full_precision() -> Iterator[None]:
    """float32 arithmetic as written while open: no TF32 in CUDA convolutions and matrix products (on by default
    for cuDNN convolutions, it moves float32 outputs by ~5e-4 relative, 5x the tolerance of an exact rewrite)."""
    matmul, convolution = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, convolution


def fresh(inputs):
    """A copy of `inputs` (any nesting) with every tensor cloned, for one run that may write into them."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), inputs)


def output_tensors(result) -> list[torch.Tensor]:
    """The tensors of a graph's output, in pytree order."""
    return [t.detach() for t in pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]


@torch.no_grad()
def outputs(gm: fx.GraphModule, samples: list[tuple]) -> list[list[torch.Tensor]]:
    """The tensor outputs of `gm` on fresh copies of each sample."""
    return [output_tensors(gm(*fresh(args))) for args in samples]


def tolerance_for(tolerance: float, tensors) -> float:
    """`tolerance`, widened to LOW_PRECISION_EPS machine epsilons of the least precise floating dtype among
    `tensors` (nested lists of the graph's outputs, inputs and constants): a rewrite that is exact in real
    arithmetic still rounds differently, by up to about two epsilons of float16 or bfloat16 on torchvision
    models."""
    eps = max((torch.finfo(t.dtype).eps for t in pytree.tree_leaves(tensors)
               if isinstance(t, torch.Tensor) and t.is_floating_point()), default=0.0)
    return max(tolerance, LOW_PRECISION_EPS * eps)


def relative_error(reference: list[list[torch.Tensor]], actual: list[list[torch.Tensor]]) -> float:
    """Worst over the outputs of max |actual - reference| / max |reference|, both maxima taken over all
    samples, so that an output which happens to be near zero on one sample (a cancelling sum) does not
    make a rounding difference look large. inf when the outputs' number or shapes differ."""
    if len(reference) != len(actual) or any(len(r) != len(a) or any(x.shape != y.shape for x, y in zip(r, a))
                                            for r, a in zip(reference, actual)):
        return float("inf")
    worst = 0.0
    for index in range(len(reference[0]) if reference else 0):
        pairs = [(ref[index].double(), out[index].double()) for ref, out in zip(reference, actual)
                 if ref[index].numel()]
        if not pairs:
            continue
        scale = max(ref.abs().max().item() for ref, _ in pairs) or 1.0
        error = max((out - ref).abs().max().item() for ref, out in pairs) / scale
        worst = max(worst, error if error == error else float("inf"))
    return worst
