"""Fully linearised real networks merge down to the fewest weight layers the merge rules allow."""
import pytest
import torch
import torchvision

import fxcompress
from helpers import all_activations, linearized_reference, relative_error, torchvision_model

@pytest.fixture(scope="module")
def example():
    return (torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)),)


@pytest.mark.slow
def test_mobilenet_v2_collapses_every_inverted_residual_exactly(example):
    model = torchvision_model("mobilenet_v2")
    blocks = sum(isinstance(m, torchvision.models.mobilenetv2.InvertedResidual) for m in model.modules())
    result = fxcompress.compress(model, example, plan=all_activations(model, example), force=True)
    with torch.no_grad():
        reference = linearized_reference(model)(*example)
        output = result.module(*example)
    # Exact merges only: each block (expand 1x1 -> dw 3x3 -> project 1x1, + shortcut) becomes one dense
    # 3x3; merging two 3x3 would be approximate; the last 1x1 conv folds into the last block.
    assert result.report.after.weight_layers == 1 + blocks + 1
    assert result.report.after.activations == 0
    assert not result.report.approximations
    assert relative_error(reference, output) <= 1e-5


@pytest.mark.slow
def test_resnet18_merges_each_block_and_flags_border_approximation(example):
    model = torchvision_model("resnet18")
    blocks = sum(isinstance(m, torchvision.models.resnet.BasicBlock) for m in model.modules())
    result = fxcompress.compress(model, example, plan=all_activations(model, example), force=True,
                                 allow_approximate=True)
    # Each BasicBlock (3x3 -> 3x3, + identity or 1x1 downsample) becomes one 5x5 or 7x7 conv; merging
    # two blocks would exceed max_kernel_size=7; max-pool blocks the stem.
    assert result.report.after.weight_layers == 1 + blocks + 1
    assert len(result.report.approximations) == blocks
    assert all("border ring" in rewrite.detail for rewrite in result.report.approximations)


@pytest.mark.parametrize("block_name", ["layer1.0", "layer2.0"])
def test_resnet_block_merge_is_exact_away_from_the_border(block_name):
    block = linearized_reference(torchvision_model("resnet18")).get_submodule(block_name)
    x = torch.randn(2, block.conv1.in_channels, 16, 16, generator=torch.Generator().manual_seed(3))
    result = fxcompress.compress(block, (x,), force=True, allow_approximate=True)
    with torch.no_grad():
        reference, output = block(x), result.module(x)
    assert result.report.after.weight_layers == 1
    assert len(result.report.approximations) == 1
    interior = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    assert relative_error(reference[interior], output[interior]) <= 1e-5
    assert relative_error(reference, output) > 1e-3  # the border ring does differ


@pytest.mark.slow
def test_without_approximation_resnet_blocks_stay_apart(example):
    model = torchvision_model("resnet18")
    result = fxcompress.compress(model, example, plan=all_activations(model, example), force=True)
    with torch.no_grad():
        reference = linearized_reference(model)(*example)
        output = result.module(*example)
    # Every 3x3 -> 3x3 merge would be approximate, and the shortcuts can only join a merged block.
    assert not result.report.approximations
    assert result.report.after.weight_layers == result.report.before.weight_layers
    assert any("approximate" in skip.reason for skip in result.report.skips)
    assert relative_error(reference, output) <= 1e-5
