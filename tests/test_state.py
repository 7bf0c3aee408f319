"""State safety: after every public call the caller's parameters, buffers (values and version counters),
`training` flags and hooks are as they were, on a broad set of models."""
import pytest
import torch
from torch import nn

import fxcompress
from helpers import all_activations, assert_state_unchanged, randomize_batchnorm, state_of, torchvision_model
from test_hardening import CalledTwice, DeadInPlaceWrite, InPlaceOnSharedOutput, SharedWeight, Structured

x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))

MODELS = {
    "resnet18": (lambda: torchvision_model("resnet18"), (image,)),
    "mobilenet_v2": (lambda: torchvision_model("mobilenet_v2", width_mult=0.25), (image,)),
    "vit": (lambda: torchvision_model("VisionTransformer", image_size=32, patch_size=16, num_layers=2,
                                      num_heads=2, hidden_dim=64, mlp_dim=128), (image,)),
    "shared_weight": (lambda: randomize_batchnorm(SharedWeight()).eval(), (x,)),
    "called_twice": (lambda: randomize_batchnorm(CalledTwice()).eval(), (x,)),
    "in_place": (lambda: randomize_batchnorm(InPlaceOnSharedOutput()).eval(), (x,)),
    "dead_in_place_write": (lambda: DeadInPlaceWrite().eval(), (x,)),
    "dict_io": (lambda: randomize_batchnorm(Structured()).eval(), ((x, 2 * x), {"scale": torch.tensor(3.0)})),
}
TORCHVISION = ("resnet18", "mobilenet_v2", "vit")  # slow lane only


def with_hooks(model: nn.Module) -> nn.Module:
    model.register_forward_hook(lambda module, args, output: None)
    model.register_forward_pre_hook(lambda module, args: None)
    next(iter(model.children())).register_forward_hook(lambda module, args, output: None)
    return model


def compress_exact(model, inputs):
    fxcompress.compress(model, inputs)


def compress_linearized(model, inputs):
    fxcompress.compress(model, inputs, plan=all_activations(model, inputs), force=True, allow_approximate=True)


def compress_bn_criterion(model, inputs):
    fxcompress.compress(model, inputs, criterion="bn")


def names(model, inputs):
    fxcompress.api.activation_names(model, inputs)


def backend(model, inputs):
    with torch.no_grad():
        torch.compile(model, backend="depthprune", options={"lowering": "eager", "force": True})(*inputs)


CALLS = {"compress": compress_exact, "compress_linearized": compress_linearized,
         "compress_bn_criterion": compress_bn_criterion, "activation_names": names, "backend": backend}


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name in TORCHVISION else name
                                  for name in MODELS])
def test_public_calls_leave_the_callers_model_as_it_was(name, call):
    make, inputs = MODELS[name]
    model = with_hooks(make())
    inputs_before = [t.clone() for t in torch.utils._pytree.tree_leaves(inputs)]
    before = state_of(model)
    CALLS[call](model, inputs)
    assert_state_unchanged(before, model)
    assert all(torch.equal(old, new) for old, new in zip(inputs_before, torch.utils._pytree.tree_leaves(inputs)))
