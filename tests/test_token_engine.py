"""One token engine: the graph path (`merge_tokens` in a captured graph, through torch.compile or a plan from
`token_plan`) reduces the same tokens as the module path (`reduce_tokens`) for the same TokenConfig: the same
prefix tokens protected (timm's register tokens too), the same keys matched on."""
from __future__ import annotations

import pytest
import torch
import torchvision

import fxcompress
from fxcompress.capture import capture
from fxcompress.errors import OptionError
from fxcompress.graph import annotate_names, annotate_shapes
from fxcompress.tokens import TokenConfig, find_encoder, reduce_tokens
from fxcompress.tokens.graph import token_plan

timm = pytest.importorskip("timm")
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


class TorchvisionFeatures(torch.nn.Module):
    """torchvision's ViT up to the encoder's output tokens (its forward without the head)."""

    def __init__(self, vit: torch.nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, images):
        x = self.vit._process_input(images)
        x = torch.cat([self.vit.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.vit.encoder(x)


class TimmFeatures(torch.nn.Module):
    def __init__(self, vit: torch.nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, images):
        return self.vit.forward_features(images)


def torchvision_vit() -> torch.nn.Module:
    """4 x 4 patches + CLS = 17 tokens."""
    torch.manual_seed(0)
    return TorchvisionFeatures(torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)).eval()


def timm_vit(**options) -> torch.nn.Module:
    """4 x 4 patches + CLS + 4 register tokens = 21 tokens."""
    torch.manual_seed(0)
    options = {"reg_tokens": 4, **options}
    return TimmFeatures(timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0, **options)).eval()


MODELS = {"torchvision": torchvision_vit, "timm": timm_vit}
PREFIX = {"torchvision": 1, "timm": 5}  # CLS (+ 4 registers)


def module_path(model, config: dict) -> torch.Tensor:
    with torch.no_grad():
        return reduce_tokens(model, **config)(IMAGES)


def dynamo_path(model, config: dict) -> torch.Tensor:
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="depthprune", options={"tokens": config, "lowering": "eager"})
    with torch.no_grad():
        return compiled(IMAGES)


def export_plan(model, config: dict) -> fxcompress.Plan:
    with torch.no_grad():
        gm = capture(model, (IMAGES,))
    annotate_names(gm)
    annotate_shapes(gm, [IMAGES])
    return token_plan(gm, TokenConfig(**config))


def export_path(model, config: dict) -> torch.Tensor:
    result = fxcompress.compress(model, (IMAGES,), plan=export_plan(model, config), dynamic_batch=False)
    with torch.no_grad():
        return result.module(IMAGES)


SLOW = pytest.mark.slow


@pytest.mark.parametrize("name, config", [
    ("torchvision", {"method": "folder", "layers": [0, 1], "ratio": 0.5}),  # keys of an opaque MHA, sizes threaded
    pytest.param("torchvision", {"method": "tome", "ratio": 0.5, "restore_order": True}, marks=SLOW),
    pytest.param("torchvision", {"method": "pool", "layers": [0], "ratio": 0.75}, marks=SLOW),
    pytest.param("timm", {"method": "folder", "layers": [-1], "ratio": 0.5}, marks=SLOW),
    pytest.param("timm", {"method": "pool", "layers": [-1], "ratio": 0.75}, marks=SLOW),
])
def test_torch_compile_reduces_the_tokens_reduce_tokens_does(name, config):
    model = MODELS[name]()
    expected = module_path(model, config)
    out = dynamo_path(model, config)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["torchvision", pytest.param("timm", marks=SLOW)])
@pytest.mark.parametrize("method", ["folder", pytest.param("pool", marks=SLOW)])
def test_a_plan_from_the_export_graph_reduces_the_tokens_reduce_tokens_does(name, method):
    model = MODELS[name]()
    config = {"method": method, "layers": [-1], "ratio": 0.5 if method == "folder" else 0.75}
    assert [d.params["protected"] for d in export_plan(model, config).decisions] == [PREFIX[name]]
    expected = module_path(model, config)
    out = export_path(model, config)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_graph_protects_the_register_tokens_of_the_module():
    model = timm_vit()
    assert find_encoder(model).protected == model.vit.num_prefix_tokens == PREFIX["timm"]
    with torch.no_grad():
        reference = model(IMAGES)
    out = dynamo_path(model, {"layers": [-1], "ratio": 0.9})
    assert out.shape[1] == PREFIX["timm"] + 2
    torch.testing.assert_close(out[:, :PREFIX["timm"]], reference[:, :PREFIX["timm"]], atol=1e-5, rtol=1e-5)


@SLOW
@pytest.mark.parametrize("name", MODELS)
def test_drop_keeps_the_prefix_and_a_subset_of_the_other_tokens(name):
    model, prefix = MODELS[name](), PREFIX[name]
    config = {"method": "drop", "layers": [-1], "ratio": 0.5}
    with torch.no_grad():
        reference = model(IMAGES)
    out = dynamo_path(model, config)
    assert out.shape == module_path(model, config).shape
    torch.testing.assert_close(out[:, :prefix], reference[:, :prefix], atol=1e-5, rtol=1e-5)
    distance = torch.cdist(out[:, prefix:], reference[:, prefix:])  # each kept token is one of the patch tokens
    assert distance.min(dim=-1).values.max() < 1e-4


def test_matching_without_readable_keys_is_refused_naming_the_layer():
    model = timm_vit()
    for block in model.vit.blocks:
        block.attn.fused_attn = False  # attention as q @ k^T, softmax: no scaled_dot_product_attention
    with pytest.raises(OptionError, match=r"cannot match tokens after encoder layer 1 \(vit\.blocks\.1\): folder "
                                          r"matches on the keys"):
        export_plan(model, {"layers": [-1], "ratio": 0.5})
    assert export_plan(model, {"method": "pool", "layers": [-1], "ratio": 0.75}).decisions


def test_a_graph_without_prefix_concatenation_is_refused():
    model = timm_vit(reg_tokens=0, class_token=False, global_pool="avg")
    assert find_encoder(model).protected == 0
    with pytest.raises(OptionError, match=r"cannot tell how many prefix tokens .* no concatenation of tokens"):
        export_plan(model, {"method": "pool", "layers": [-1], "ratio": 0.75})
