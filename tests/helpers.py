"""Shared test helpers: real models with randomised BatchNorm, both capture methods, error measure."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import fxcompress
from fxcompress.capture import bake_weights, capture, scalar_placeholders, weight_placeholders
from fxcompress.graph import annotate_names
from fxcompress.pipeline import activation_names


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fresh BatchNorm is nearly the identity and hides folding bugs: give it real-looking statistics."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            channels = module.num_features
            module.running_mean.copy_(torch.randn(channels, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(channels, generator=generator) * 1.5 + 0.5)
            module.weight.data.copy_(1 + 0.3 * torch.randn(channels, generator=generator))
            module.bias.data.copy_(0.3 * torch.randn(channels, generator=generator))
    return model


def torchvision_model(name: str, **kwargs) -> torch.nn.Module:
    """A torchvision model, random init, eval mode, with randomised BatchNorm and no all-zero layer
    (ViT's head starts at zero, which would make every output 0 and every comparison vacuous)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(**kwargs)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and not module.weight.any():
                module.weight.normal_(0, 0.02)
    return randomize_batchnorm(model).eval()


def relative_error(reference: torch.Tensor, actual: torch.Tensor) -> float:
    return ((actual - reference).abs().max() / reference.abs().max()).item()


def dynamo_graph(model: torch.nn.Module, inputs: tuple):
    """The graph dynamo hands a backend, with its weight placeholders baked: (GraphModule, runtime inputs)."""
    captured = {}

    def grab(gm, example_inputs):
        captured["gm"], captured["inputs"] = gm, list(example_inputs)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=grab, fullgraph=True)(*inputs)
    torch._dynamo.reset()
    gm, example_inputs = captured["gm"], captured["inputs"]
    weights, scalars = weight_placeholders(gm, example_inputs), scalar_placeholders(gm, example_inputs)
    runtime = [value for i, value in enumerate(example_inputs) if i not in weights + scalars]
    return bake_weights(gm, example_inputs, weights, scalars), runtime


def export_graph(model: torch.nn.Module, inputs: tuple):
    return capture(model, inputs), list(inputs)


CAPTURES = {"export": export_graph, "dynamo": dynamo_graph}


def all_activations(model: torch.nn.Module, inputs: tuple) -> fxcompress.Plan:
    gm = capture(model, inputs)
    annotate_names(gm)
    return fxcompress.Plan.linearize(activation_names(gm))


def state_of(model: torch.nn.Module) -> dict:
    """Everything a public call must leave untouched: tensors (by value and version), flags and hooks."""
    tensors = {name: (t.detach().clone(), t._version) for name, t in model.state_dict(keep_vars=True).items()}
    flags = {name: module.training for name, module in model.named_modules()}
    hooks = {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}
    return {"tensors": tensors, "flags": flags, "hooks": hooks}


def assert_state_unchanged(before: dict, model: torch.nn.Module) -> None:
    after = state_of(model)
    assert before["flags"] == after["flags"]
    assert before["hooks"] == after["hooks"]
    assert before["tensors"].keys() == after["tensors"].keys()
    for name, (tensor, version) in before["tensors"].items():
        new_tensor, new_version = after["tensors"][name]
        assert torch.equal(tensor, new_tensor), f"{name} changed"
        assert version == new_version, f"{name} was written in place"


def linearized_reference(model: torch.nn.Module) -> torch.nn.Module:
    """The same network with every ReLU/ReLU6 module replaced by identity, built without fxcompress."""
    reference = copy.deepcopy(model)
    for module in list(reference.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, (torch.nn.ReLU, torch.nn.ReLU6)):
                setattr(module, child_name, torch.nn.Identity())
    return reference


@pytest.fixture
def one_thread():
    """Tiny models in one thread: with two, OpenMP barriers dominate and cost ~100x on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class OneDevice(TorchDispatchMode):
    """Raises where an op takes tensors (of one dim or more) on different devices. On the `meta` device torch
    itself does not check index tensors, so a CPU index created by a pass for a GPU graph goes unnoticed there:
    this mode notices it on a CPU-only machine."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {t.device for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim()}
        if len(devices) > 1:
            raise AssertionError(f"{func} mixes devices {sorted(map(str, devices))}")
        return func(*args, **kwargs)
