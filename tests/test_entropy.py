"""annotate_entropy against a direct computation, on conv, token and plain layouts, through both captures."""
import math
import sys

import pytest
import torch
from torch import nn

from fxcompress import meta
from fxcompress.config import CompressConfig
from fxcompress.context import Calibration, PassContext
from fxcompress.criteria import ChannelStatistics
from fxcompress.errors import OptionError
from fxcompress.graph import annotate_names, annotate_shapes, stable_name
from fxcompress.passes import ANALYSES
from helpers import CAPTURES

capture_methods = pytest.mark.parametrize("capture", CAPTURES)
ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU}
LAYOUTS = {  # producer, input shape, channel axis of its output
    "conv": (lambda: nn.Conv2d(3, 6, 3, padding=1), (4, 3, 8, 8), 1),
    "tokens": (lambda: nn.Linear(5, 6), (4, 7, 5), 2),
    "plain": (lambda: nn.Linear(5, 6), (4, 5), 1),
}


def annotate(capture, model, batches, progress=False):
    gm, runtime = CAPTURES[capture](model.eval(), (batches[0],))
    annotate_names(gm)
    annotate_shapes(gm, runtime)
    ctx = PassContext(CompressConfig(), "annotate_entropy", calibration=Calibration(batches, progress))
    ANALYSES["annotate_entropy"](gm, ctx)
    return {stable_name(n): n.meta[meta.ACTIVATION_STATS] for n in gm.graph.nodes if meta.ACTIVATION_STATS in n.meta}


def direct_entropy(z: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """p_on and entropy per channel, written out without fxcompress."""
    on = (z >= 0).double().movedim(axis, 0).reshape(z.shape[axis], -1)
    p = on.mean(1)
    h = torch.tensor([0.0 if q in (0.0, 1.0) else -q * math.log2(q) - (1 - q) * math.log2(1 - q) for q in p.tolist()],
                     dtype=torch.float64)
    return p, h


@capture_methods
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_entropy_matches_direct_computation(capture, activation, layout):
    make, shape, axis = LAYOUTS[layout]
    torch.manual_seed(0)
    model = nn.Sequential(make(), ACTIVATIONS[activation]())
    batches = [torch.randn(*shape) for _ in range(3)]
    stats = annotate(capture, model, batches)
    assert list(stats) == [f"1:{'hardtanh' if activation == 'relu6' else activation}"]
    (result,) = stats.values()
    with torch.no_grad():
        z = torch.cat([model[0](batch) for batch in batches])
    p, h = direct_entropy(z, axis)
    torch.testing.assert_close(result.p_on, p)
    torch.testing.assert_close(result.entropy, h)
    assert result.layer_entropy == pytest.approx(h.mean().item())
    assert result.samples == z.numel() // z.shape[axis]
    torch.testing.assert_close(result.mean, z.movedim(axis, -1).reshape(-1, 6).double().mean(0))


def test_entropy_zero_for_always_positive_input_and_one_bit_for_symmetric_input():
    positive = nn.Linear(4, 3)
    symmetric = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        positive.weight.abs_()
        positive.bias.fill_(0.5)
        symmetric.weight.copy_(torch.randn(3, 4))

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.positive, self.symmetric = positive, symmetric

        def forward(self, x):
            return torch.relu(self.positive(x.abs())), torch.relu(self.symmetric(x))

    x = torch.randn(6, 4)
    stats = annotate("export", Two(), [torch.cat([x, -x])])
    assert stats["root:relu"].layer_entropy == 0 and bool(stats["root:relu"].constant.all())
    assert stats["root:relu#1"].layer_entropy == pytest.approx(1.0)
    torch.testing.assert_close(stats["root:relu#1"].p_on, torch.full((3,), 0.5, dtype=torch.float64))


def test_egp_variant_ignores_channels_constant_within_a_batch():
    statistics = ChannelStatistics()
    for _ in range(2):
        z = torch.randn(50, 3)
        z[:, 0] = z[:, 0].abs() + 0.1  # always on
        z[:, 1] = -z[:, 1].abs() - 0.1  # always off
        statistics.update(z, 1)
    result = statistics.result()
    assert result.constant.tolist() == [True, True, False]
    assert result.layer_entropy == pytest.approx(result.entropy[2].item() / 3)
    assert result.layer_entropy_egp == pytest.approx(result.entropy[2].item())


def test_streaming_equals_one_big_batch():
    torch.manual_seed(1)
    z = torch.randn(40, 5, 3, 3) + torch.linspace(-1, 1, 5).reshape(1, 5, 1, 1)
    whole, parts = ChannelStatistics(), ChannelStatistics()
    whole.update(z, 1)
    for chunk in z.split(7):
        parts.update(chunk, 1)
    torch.testing.assert_close(whole.result().entropy, parts.result().entropy)
    torch.testing.assert_close(whole.result().std, parts.result().std)


def test_progress_bar_and_data_loader_style_batches(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # bars show on a terminal only
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU())
    batches = [(torch.randn(4, 5), torch.zeros(4)) for _ in range(2)]  # (inputs, labels)
    gm, _ = CAPTURES["export"](model.eval(), (batches[0][0],))
    annotate_names(gm)
    ctx = PassContext(CompressConfig(), "annotate_entropy", calibration=Calibration(batches, progress=True))
    ANALYSES["annotate_entropy"](gm, ctx)
    assert "calibration: activation states" in capsys.readouterr().err  # a user-facing label, not the pass name
    assert meta.ACTIVATION_STATS in [n for n in gm.graph.nodes if stable_name(n) == "1:relu"][0].meta


def test_missing_or_used_up_calibration_is_an_option_error():
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU())
    gm, _ = CAPTURES["export"](model.eval(), (torch.randn(4, 5),))
    annotate_names(gm)
    with pytest.raises(OptionError, match="needs calibration data"):
        ANALYSES["annotate_entropy"](gm, PassContext(CompressConfig(), "annotate_entropy"))
    calibration = Calibration(iter([torch.randn(4, 5)]))
    ANALYSES["annotate_entropy"](gm, PassContext(CompressConfig(), "annotate_entropy", calibration=calibration))
    with pytest.raises(OptionError, match="one-shot iterator"):
        ANALYSES["annotate_entropy"](gm, PassContext(CompressConfig(), "annotate_entropy", calibration=calibration))
    with pytest.raises(OptionError, match="iterable of batches"):
        Calibration(torch.randn(4, 5))
