"""TorchInductor lowering. A whole model is compiled with freezing: weights become constants, so Inductor's own
conv+BatchNorm folding applies to the original model too and a measured gain must come from removed depth. The
graph dynamo hands the depthprune backend already has its weights baked as constants."""
import torch

FREEZING = {"freezing": True}


def graph(gm, example_inputs, options: dict | None = None):
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, list(example_inputs), config_patches=options or {})


def module(model, example_inputs, options: dict | None = None):
    return torch.compile(model, backend="inductor", options={**FREEZING, **(options or {})})
