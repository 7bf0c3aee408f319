"""TorchInductor lowering with freezing: weights become constants, so Inductor's own conv+BatchNorm
folding applies to the original model too and a measured gain must come from removed depth."""
import torch


def graph(gm, example_inputs):
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, list(example_inputs))


def module(model, example_inputs):
    return torch.compile(model, backend="inductor", options={"freezing": True})
