"""TLC on vision transformers: GELU's regions are only approximate, yet TLC scores its MLP activations from the
measured pre-activation statistics, removes the off channels (fc1 rows, fc2 columns) and linearises the rest; the
result equals the MLP rebuilt by hand in plain torch. ReLU layers keep the exact score."""
import copy
import functools
import random

import pytest
import torch
import torchvision
from torch import fx, nn

import fxcompress
from fxcompress import Plan
from fxcompress.finetune.methods import StepInputs, make_method
from fxcompress.trainable import apply_plan
from fxcompress.planner import approximation_error
from helpers import one_thread  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
BATCH = 8
GENERATOR = torch.Generator().manual_seed(0)
EXAMPLE = (torch.randn(BATCH, 3, 16, 16, generator=GENERATOR),)
CALIBRATION = [(torch.randn(BATCH, 3, 16, 16, generator=GENERATOR),) for _ in range(4)]
FRESH = (torch.randn(BATCH, 3, 16, 16, generator=GENERATOR),)


@functools.cache
def torchvision_vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10)
    nn.init.normal_(model.heads.head.weight)  # torchvision initialises the head to zeros
    return model.eval()


@functools.cache
def timm_vit() -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=10,
                                                            embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0).eval()


def mlps(model: nn.Module) -> dict[str, tuple[nn.Module, str, str, str]]:
    """GELU stable name -> (MLP module, fc1, activation and fc2 attribute names)."""
    if isinstance(model, torchvision.models.VisionTransformer):
        return {f"encoder.layers.encoder_layer_{i}.mlp.1:gelu": (layer.mlp, "0", "1", "3")
                for i, layer in enumerate(model.encoder.layers)}
    return {f"blocks.{i}.mlp.act:gelu": (block.mlp, "fc1", "act", "fc2") for i, block in enumerate(model.blocks)}


def off_channels(model: nn.Module, fc1: nn.Linear) -> list[int]:
    """The channels whose pre-activation mean over the calibration batches is negative (P(off) > 1/2)."""
    outputs = []
    handle = fc1.register_forward_hook(lambda module, args, output: outputs.append(output.flatten(0, -2)))
    with torch.no_grad():
        for (batch,) in CALIBRATION:
            model(batch)
    handle.remove()
    return (torch.cat(outputs).mean(0) < 0).nonzero().flatten().tolist()


def reference(model: nn.Module, targets: list[str]) -> nn.Module:
    """The model with each targeted MLP's GELU replaced by identity and its off channels (measured on `model`, as
    TLC does in one step) dropped: fc1 rows, fc2 columns."""
    off = {target: off_channels(model, getattr(*mlps(model)[target][:2])) for target in targets}
    model = copy.deepcopy(model)
    for target in targets:
        mlp, fc1_name, act_name, fc2_name = mlps(model)[target]
        fc1, fc2 = getattr(mlp, fc1_name), getattr(mlp, fc2_name)
        keep = [c for c in range(fc1.out_features) if c not in off[target]]
        new_fc1, new_fc2 = nn.Linear(fc1.in_features, len(keep)), nn.Linear(len(keep), fc2.out_features)
        with torch.no_grad():
            new_fc1.weight.copy_(fc1.weight[keep])
            new_fc1.bias.copy_(fc1.bias[keep])
            new_fc2.weight.copy_(fc2.weight[:, keep])
            new_fc2.bias.copy_(fc2.bias)
        for name, module in ((fc1_name, new_fc1), (act_name, nn.Identity()), (fc2_name, new_fc2)):
            setattr(mlp, name, module) if not name.isdigit() else mlp.__setitem__(int(name), module)
    return model.eval()


@functools.cache
def tlc_choices(model: nn.Module, count: int):
    planned = apply_plan(model, Plan(), EXAMPLE)
    inputs = StepInputs(EXAMPLE, CALIBRATION, None, random.Random(0))
    return make_method("tlc").choose(planned, inputs, count)


@pytest.mark.parametrize("make", [torchvision_vit, timm_vit], ids=["torchvision", "timm"])
def test_tlc_linearises_gelu_mlps_without_their_off_channels_as_the_hand_built_mlp(make):
    model = make()
    choices = tlc_choices(model, 2)
    assert sorted(choice.target for choice in choices) == sorted(mlps(model))
    for choice in choices:
        fc1 = getattr(*mlps(model)[choice.target][:2])
        off = off_channels(model, fc1)
        assert 0 < len(off) < fc1.out_features
        assert [(d.action, d.params) for d in choice.decisions] == [("remove_channels", {"channels": off}),
                                                                   ("linearize", {})]
        assert 0 < choice.score < 2
    plan = Plan(tuple(decision for choice in choices for decision in choice.decisions))
    expected = reference(model, [choice.target for choice in choices])
    result = fxcompress.compress(model, EXAMPLE, plan=plan)
    with torch.no_grad():
        wanted, original = expected(*FRESH), model(*FRESH)
        assert (wanted - original).abs().max() > 1e-2  # the GELUs and the off channels mattered
        torch.testing.assert_close(result.module(*FRESH), wanted, rtol=1e-4, atol=1e-5)
    # per token and layer the MLP's d x m and m x d linears collapse into one d x d linear
    tokens, width, hidden = 1 + (16 // 4) ** 2, 32, 64
    assert result.report.before.macs - result.report.after.macs == \
        BATCH * tokens * 2 * (2 * width * hidden - width * width)


@pytest.mark.parametrize("build", [timm_vit, torchvision_vit], ids=["timm", "torchvision"])
def test_the_planned_vit_equals_the_hand_built_mlp(build, one_thread):
    model = build()
    choices = tlc_choices(model, 2)
    planned = apply_plan(model, Plan(tuple(d for choice in choices for d in choice.decisions)), EXAMPLE)
    expected = reference(model, [choice.target for choice in choices])
    with torch.no_grad():
        torch.testing.assert_close(planned(*FRESH), expected(*FRESH), rtol=1e-4, atol=1e-5)


def test_gelu_needs_calibration_and_relu_keeps_its_exact_score(one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8),
                          nn.GELU(), nn.Linear(8, 3)).eval()
    for norm in (model[1], model[4]):
        with torch.no_grad():
            norm.bias.copy_(torch.linspace(-2, 2, 8))
            norm.weight.copy_(torch.linspace(0.5, 1.5, 8))
    example = (torch.randn(4, 6),)
    planned = apply_plan(model, Plan(), example)
    choices = make_method("tlc").choose(planned, StepInputs(example, [], None, random.Random(0)), 2)
    assert [choice.target for choice in choices] == ["2:relu"]  # the GELU has no measured statistics
    beta, gamma = model[1].bias.detach().double(), model[1].weight.detach().double()
    assert choices[0].score == pytest.approx(torch.special.ndtr(-beta.abs() / gamma.abs()).mean().item(), rel=1e-9)
    assert choices[0].decisions[0].params == {"channels": [0, 1, 2, 3]}



def activation_node(function) -> fx.Node:
    graph = fx.symbolic_trace(lambda x: function(x))
    return next(node for node in graph.graph.nodes if node.op == "call_function")


def test_the_approximation_error_of_gelu_is_its_relative_rms_distance_from_relu():
    mean, std = torch.tensor([-1.0, 0.5, 2.0]), torch.tensor([0.5, 1.0, 0.2])
    z = mean + std * torch.randn(400_000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gelu = nn.functional.gelu(z)
    expected = (((gelu - z.clamp(min=0)) ** 2).sum() / (gelu ** 2).sum()).sqrt().item()
    assert approximation_error(activation_node(nn.functional.gelu), mean, std) == pytest.approx(expected, rel=0.01)
    assert approximation_error(activation_node(nn.functional.relu), mean, std) == 0
