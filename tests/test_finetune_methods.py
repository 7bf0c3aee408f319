"""The methods' choices on the current model, against references computed by hand: EASIER's entropy order,
TLC's off channels (beta < 0), the latency selection's joint candidates, the random order's seed."""
import math
import random

import pytest
import torch
import torchvision

import fxcompress
from fxcompress import Plan
from fxcompress.trainable import apply_plan
from fxcompress.finetune.methods import StepInputs, make_method

from helpers import randomize_batchnorm
from loop_models import small_cnn

X = (torch.randn(1, 3, 16, 16),)
CALIBRATION = [(torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i)),) for i in range(2)]


def inputs(seed=0):
    return StepInputs(X, CALIBRATION, None, random.Random(seed))


def entropy_by_hand(model) -> dict[str, float]:
    """Layer entropy of each ReLU module's input (read before the in-place ReLU writes it), pooled over the
    calibration batches: mean over channels of the binary entropy of P(z >= 0)."""
    counts = {}

    def record(name):
        def hook(module, args):
            z = args[0].detach().transpose(0, 1).flatten(1)
            on, total = counts.get(name, (0, 0))
            counts[name] = (on + (z >= 0).double().sum(1), total + z.shape[1])
        return hook

    handles = [module.register_forward_pre_hook(record(f"{name}:relu")) for name, module in model.named_modules()
               if isinstance(module, torch.nn.ReLU)]
    with torch.no_grad():
        for (batch,) in CALIBRATION:
            model(batch)
    for handle in handles:
        handle.remove()
    result = {}
    for name, (on, total) in counts.items():
        p = (on / total).clamp(1e-12, 1 - 1e-12)
        h = -(p * p.log2() + (1 - p) * (1 - p).log2())
        result[name] = float(torch.where((p <= 1e-12) | (p >= 1 - 1e-12), torch.zeros_like(h), h).mean())
    return result


def test_easier_takes_the_lowest_entropy_activations_and_rescores_the_current_model():
    model = randomize_batchnorm(small_cnn()).eval()
    expected = sorted(entropy_by_hand(model).items(), key=lambda item: item[1])
    chosen = make_method("easier").choose(model, inputs(), 2)
    assert [choice.target for choice in chosen] == [name for name, _ in expected[:2]]
    assert [choice.score for choice in chosen] == [pytest.approx(h, abs=1e-9) for _, h in expected[:2]]
    planned = apply_plan(model, Plan.linearize([expected[0][0]]), X)
    rescored = make_method("easier").choose(planned, inputs(), 3)
    assert expected[0][0] not in [choice.target for choice in rescored]
    reference = dict(sorted(entropy_by_hand(planned).items(), key=lambda item: item[1]))
    assert [choice.target for choice in rescored] == [name for name in reference if name != expected[0][0]][:3]


def test_tlc_removes_or_zeroes_exactly_the_channels_with_negative_beta():
    model = randomize_batchnorm(small_cnn()).eval()
    chosen = make_method("tlc").choose(model, StepInputs(X, [], None, random.Random(0)), 4)
    assert chosen
    batchnorms = {f"{index + 1}:relu": module for index, module in enumerate(model)
                  if isinstance(module, torch.nn.BatchNorm2d)}
    for choice in chosen:
        beta = batchnorms[choice.target].bias.detach()
        off = sorted(torch.nonzero(beta < 0).flatten().tolist())
        actions = {decision.action: decision for decision in choice.decisions}
        assert "linearize" in actions
        channel_decisions = [d for d in choice.decisions if d.action in ("remove_channels", "zero_channels")]
        assert (channel_decisions[0].params["channels"] if channel_decisions else []) == off


@pytest.mark.slow  # about 30 compressions of MobileNetV2
def test_latency_selection_takes_the_pair_that_merges_an_inverted_residual():
    model = randomize_batchnorm(torchvision.models.mobilenet_v2()).eval()
    x = (torch.randn(1, 3, 32, 32),)
    step = StepInputs(x, [(torch.randn(4, 3, 32, 32),)], None, random.Random(0))
    chosen = make_method("easier", "latency").choose(model, step, 2)
    pair = [d.target for choice in chosen for d in choice.decisions]
    assert len(pair) == 2 and pair[0].split(".conv.")[0] == pair[1].split(".conv.")[0]  # one block's two
    dense = fxcompress.compress(model, x).report.after
    after = fxcompress.compress(model, x, plan=Plan.linearize(pair)).report.after
    assert after.weight_layers < dense.weight_layers and after.macs < dense.macs
    assert all(math.isfinite(choice.score) for choice in chosen)


def test_random_order_depends_only_on_its_seed():
    model = small_cnn()
    first = [c.target for c in make_method("random").choose(model, inputs(seed=3), 2)]
    again = [c.target for c in make_method("random").choose(model, inputs(seed=3), 2)]
    other = [[c.target for c in make_method("random").choose(model, inputs(seed=s), 4)] for s in range(4)]
    assert first == again and len({tuple(order) for order in other}) > 1
