"""The module `compress` returns behaves like a torch module: eval, to, half, deepcopy, save/load, export; train
is refused with the reason; inputs of other shapes get an error naming the shape it was captured for."""
import copy
import io

import pytest
import torch

import fxcompress
from fxcompress.compressed import CompressedModule
from helpers import relative_error, torchvision_model


@pytest.fixture(scope="module")
def compressed():
    model = torchvision_model("mobilenet_v2", num_classes=10)
    example = (torch.randn(2, 3, 32, 32),)
    plan = fxcompress.Plan.linearize(["features.2.conv.0.2:hardtanh", "features.2.conv.1.2:hardtanh"])
    result = fxcompress.compress(model, example, plan=plan)
    assert result.report.after.weight_layers < result.report.before.weight_layers  # the plan merged something
    return result.module, example, result.module(*example)


def test_eval_works_and_train_is_refused(compressed):
    module, example, expected = compressed
    assert isinstance(module, CompressedModule) and module.eval() is module and not module.training
    with pytest.raises(fxcompress.OptionError, match="a compressed module is an inference graph"):
        module.train()
    assert not module.training and torch.equal(module(*example), expected)


def test_copies_moves_and_casts(compressed):
    module, example, expected = compressed
    assert torch.equal(copy.deepcopy(module)(*example), expected)
    assert relative_error(expected, copy.deepcopy(module).to("cpu", torch.float64)(example[0].double())) < 1e-5
    half = copy.deepcopy(module).bfloat16()
    assert {t.dtype for t in half.state_dict().values() if t.is_floating_point()} == {torch.bfloat16}
    assert relative_error(expected, half(example[0].bfloat16()).float()) < 5e-2
    assert {t.dtype for t in module.state_dict().values() if t.is_floating_point()} == {torch.float32}


def test_save_and_load_keep_the_class_and_the_outputs(compressed, tmp_path):
    module, example, expected = compressed
    torch.save(module, tmp_path / "module.pt")
    loaded = torch.load(tmp_path / "module.pt", weights_only=False)
    assert isinstance(loaded, CompressedModule) and torch.equal(loaded(*example), expected)
    with pytest.raises(fxcompress.OptionError):
        loaded.train()
    state = io.BytesIO()
    torch.save(module.state_dict(), state)
    state.seek(0)
    fresh = copy.deepcopy(module)
    fresh.load_state_dict(torch.load(state))
    assert torch.equal(fresh(*example), expected)


def test_exports_as_a_program(compressed, tmp_path):
    module, example, expected = compressed
    program = torch.export.export(module, example)
    torch.export.save(program, tmp_path / "module.pt2")
    assert relative_error(expected, torch.export.load(tmp_path / "module.pt2").module()(*example)) < 1e-6


def test_inputs_of_another_shape_are_refused_naming_the_captured_one(compressed):
    module, example, _ = compressed
    assert module(torch.randn(5, 3, 32, 32)).shape == (5, 10)  # the batch is dynamic
    with pytest.raises(ValueError, match=r"takes input 0 of shape \(N, 3, 32, 32\) \(N: any size\), got "
                                         r"\(1, 3, 16, 16\)"):
        module(torch.randn(1, 3, 16, 16))


def test_a_token_reduced_vit_saves_and_loads(tmp_path):
    import torchvision
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=28, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16,
                                               mlp_dim=32, num_classes=10).eval()
    example = (torch.randn(2, 3, 28, 28),)
    module = fxcompress.compress(vit, example, tokens={"method": "folder", "layers": [0], "ratio": 0.5}).module
    torch.save(module, tmp_path / "vit.pt")
    assert torch.equal(torch.load(tmp_path / "vit.pt", weights_only=False)(*example), module(*example))
