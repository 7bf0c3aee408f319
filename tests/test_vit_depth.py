"""Vision transformers made shallower: a linearised MLP (linear -> GELU -> linear) collapses into one d x d linear,
equal to the block with its GELU replaced by identity, on torchvision's and timm's ViT."""
import copy

import pytest
import torch
import torchvision
from torch import nn

import fxcompress
from fxcompress import Plan
from fxcompress.plan import Decision

timm = pytest.importorskip("timm")

X = (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
DIM, MLP, TOKENS = 32, 128, 1 + (32 // 8) ** 2


def torchvision_vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=DIM, mlp_dim=MLP, num_classes=10)
    nn.init.normal_(model.heads.head.weight)  # torchvision initialises the head to zeros: outputs would all be 0
    return model.eval()


def timm_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=DIM,
                             num_heads=2, mlp_ratio=MLP / DIM, depth=2, num_classes=10).eval()


CASES = {
    "torchvision": (torchvision_vit, "encoder.layers.encoder_layer_0.mlp.1:gelu",
                    lambda model: model.encoder.layers.encoder_layer_0.mlp.__setitem__(1, nn.Identity())),
    "timm": (timm_vit, "blocks.0.mlp.act:gelu", lambda model: setattr(model.blocks[0].mlp, "act", nn.Identity())),
}


@pytest.mark.parametrize("family", list(CASES))
def test_a_linearised_mlp_collapses_into_one_linear_equal_to_the_identity_substituted_block(family):
    make, gelu, substitute = CASES[family]
    model = make()
    reference = copy.deepcopy(model)
    substitute(reference)
    result = fxcompress.compress(model, X, plan=Plan((Decision("linearize", gelu),)))
    with torch.no_grad():
        expected, actual, original = reference(*X), result.module(*X), model(*X)
    assert (expected - original).abs().max() > 1e-2  # the GELU mattered
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    before, after = result.report.before, result.report.after
    assert after.weight_layers == before.weight_layers - 1
    assert after.activations == before.activations - 1
    # per token, the MLP's two linears (d x 4d and 4d x d: 8 d^2) became one d x d linear
    assert before.macs - after.macs == X[0].shape[0] * TOKENS * (2 * DIM * MLP - DIM * DIM)
    assert [rewrite.pass_name for rewrite in result.report.rewrites].count("merge_linear_chain") == 1
