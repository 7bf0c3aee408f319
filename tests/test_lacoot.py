"""LaCoOT: block inputs/outputs recorded at the planned model's call sites, the block-distance regulariser in the
trainer, and block removal by distance. References are plain torch forwards written here and POT called directly."""
import copy
from types import SimpleNamespace

import ot
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fxcompress
from fxcompress.errors import OptionError, PlanError
from fxcompress.blocks import monitored_blocks
from fxcompress.finetune.lacoot import BlockDistanceRegulariser, block_distances
from fxcompress.finetune.methods import Lacoot, StepInputs
from fxcompress.trainable import apply_plan, planned_graph, recording
from fxcompress.finetune.trainer import TrainConfig, train
from fxcompress.plan import Decision, Plan
from helpers import relative_error, torchvision_model

x = (torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1)),)


class Block(nn.Module):
    """y = x + conv2(relu(bn(conv1(x)))); `scale` multiplies conv2 (0: the block is the identity)."""

    def __init__(self, channels: int, scale: float = 1.0):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.relu, self.conv2 = nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1)
        with torch.no_grad():
            self.conv2.weight.mul_(scale)
            self.conv2.bias.mul_(scale)

    def body(self, x):
        return self.conv2(self.relu(self.bn(self.conv1(x))))

    def forward(self, x):
        return x + self.body(x)


class Down(nn.Module):
    """A block with a projection shortcut (named as torchvision names it)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, 3, 2, 1)
        self.downsample = nn.Conv2d(channels, 2 * channels, 1, 2)

    def forward(self, x):
        return self.conv(x) + self.downsample(x)


class Net(nn.Module):
    def __init__(self, scales=(1.0, 1.0)):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a, self.b = Block(4, scales[0]), Block(4, scales[1])
        self.down = Down(4)
        self.head = nn.Linear(8, 3)
        self.skip_b = False  # a forward that no longer calls block b (its add is then never called)

    def features(self, x):
        x = self.a(self.stem(x))
        return x if self.skip_b else self.b(x)

    def forward(self, x):
        return self.head(self.down(self.features(x)).mean((2, 3)))


def pairs_by_hand(model: Net, inputs: torch.Tensor) -> list:
    """(block input, add result) of blocks a and b, written out."""
    a_in = model.stem(inputs)
    a_out = a_in + model.a.body(a_in)
    return [("a:add", a_in, a_out), ("b:add", a_out, a_out + model.b.body(a_out))]


def pot_distance(first: torch.Tensor, second: torch.Tensor, seed: int) -> torch.Tensor:
    return ot.max_sliced_wasserstein_distance(first.flatten(1), second.flatten(1), n_projections=50, p=2, seed=seed)


def test_monitored_blocks_are_the_identity_shortcut_adds():
    assert monitored_blocks(planned_graph(Net().eval(), x)) == {"a": ("a:add",), "b": ("b:add",)}


@pytest.mark.parametrize("name, expected", [
    ("resnet18", ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]),
    ("mobilenet_v2", [f"features.{i}" for i in (3, 5, 6, 8, 9, 10, 12, 13, 15, 16)])])
def test_monitored_blocks_of_torchvision_models(name, expected):
    model = torchvision_model(name, num_classes=10)
    blocks = monitored_blocks(planned_graph(model, (torch.randn(2, 3, 32, 32),)))
    assert blocks == {block: (f"{block}:add",) for block in expected}


def test_recorded_pairs_equal_a_hand_written_forward_with_gradients():
    planned = apply_plan(Net().eval(), Plan(), x).train()
    with recording(planned, ["a:add", "b:add"]) as recorded:
        planned(*x)
        got = list(recorded)
    expected = pairs_by_hand(planned, x[0])
    assert [name for name, _, _ in got] == ["a:add", "b:add"]
    for (_, inputs, output), (_, want_in, want_out) in zip(got, expected):
        assert torch.allclose(inputs, want_in, atol=1e-6) and torch.allclose(output, want_out, atol=1e-6)
        assert output.requires_grad


def test_resnet_pair_is_the_add_result_before_the_in_place_relu():
    model = torchvision_model("resnet18", num_classes=10)
    inputs = (torch.randn(2, 3, 32, 32),)
    planned = apply_plan(model, Plan(), inputs)
    with torch.no_grad(), recording(planned, ["layer1.0:add"]) as recorded:
        planned(*inputs)
        stem = planned.maxpool(planned.relu(planned.bn1(planned.conv1(inputs[0]))))
        block = planned.layer1[0]
        body = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(stem)))))
        (name, got_in, got_out), = recorded
    assert (got_out < 0).any(), "the add's result, not the ReLU after it"
    assert relative_error(stem, got_in) <= 1e-6 and relative_error(stem + body, got_out) <= 1e-6


def test_recording_refuses_what_it_cannot_watch():
    model = Net().eval()
    with pytest.raises(PlanError, match="planned model"):
        with recording(model, ["a:add"]):
            pass
    planned = apply_plan(model, Plan((Decision("remove_block", "a:add"),)), x)
    with pytest.raises(PlanError, match="not residual adds"):
        with recording(planned, ["down.conv:conv"]):
            pass
    with pytest.raises(PlanError, match="removed"):
        with recording(planned, ["a:add"]):
            pass


def test_a_watched_add_that_is_never_called_is_an_error():
    planned = apply_plan(Net().eval(), Plan(), x)
    planned.skip_b = True
    with recording(planned, ["a:add", "b:add"]), pytest.raises(PlanError, match=r"\['b:add'\] were not called"):
        planned(*x)


def test_the_penalty_reaches_a_live_block_and_not_an_identity_block():
    planned = apply_plan(Net(scales=(1.0, 0.0)).eval(), Plan(), x).train()
    regulariser = BlockDistanceRegulariser(planned, x, weight=5.0)
    with regulariser.watching(planned):
        planned(*x)
        regulariser.penalty().backward()
    assert planned.a.conv1.weight.grad.abs().sum() > 0 and planned.a.conv2.weight.grad.abs().sum() > 0
    for parameter in planned.b.parameters():
        assert torch.equal(parameter.grad, torch.zeros_like(parameter)), "finite and zero at the identity"


def test_the_distance_is_flat_at_an_identity_block_numerically():
    # W2(x, x + e v) = |e| * const for small e (sorting keeps its order): the central difference at e = 0 is 0
    inputs, direction = torch.randn(16, 4, 3, 3), torch.randn(16, 4, 3, 3)
    step = 1e-3
    ahead, behind = (fxcompress.block_distance(inputs, inputs + e * direction).item() for e in (step, -step))
    assert ahead > 0 and abs(ahead - behind) / (2 * step) <= 1e-3 * ahead / step


def test_the_training_loss_includes_the_penalty_as_computed_directly():
    model = apply_plan(Net().eval(), Plan(), x)
    reference = copy.deepcopy(model)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    loader = DataLoader(TensorDataset(x[0], labels), batch_size=8)
    regulariser = Lacoot(weight=5.0).regulariser(model, x)
    config = TrainConfig(progress=False, lr=0.01)
    loss = train(model, loader, config, 1, seed=3, regulariser=regulariser)["epoch_losses"][0]
    torch.manual_seed(3)
    iter(loader)  # draws the loader's base seed from torch's RNG, as in `train`; then the penalty's two seeds
    seeds = [int(torch.randint(2 ** 31 - 1, ())) for _ in range(2)]
    reference.train()
    with torch.no_grad():
        cross_entropy = F.cross_entropy(Net.forward(reference, x[0]), labels)
        pairs = pairs_by_hand(reference, x[0])
    penalty = 5.0 * torch.stack([pot_distance(i, o, seed) for (_, i, o), seed in zip(pairs, seeds)]).mean()
    assert penalty > 0.1 * cross_entropy
    assert loss == pytest.approx((cross_entropy + penalty).item(), rel=1e-5)


def test_training_with_a_removed_block_regularises_the_others():
    planned = apply_plan(Net().eval(), Plan((Decision("remove_block", "a:add"),)), x)
    regulariser = Lacoot(weight=5.0).regulariser(planned, x)
    assert regulariser.blocks == {"b": ("b:add",)}
    with regulariser.watching(planned):
        planned.train()(*x)
        assert [name for name, _, _ in regulariser.recorded] == ["b:add"]
        regulariser.penalty()
    labels = torch.zeros(8, dtype=torch.long)
    loader = DataLoader(TensorDataset(x[0], labels), batch_size=4)
    result = train(planned, loader, TrainConfig(progress=False), 1, seed=0, regulariser=regulariser)
    assert result["batches"] == 2 and all(torch.isfinite(torch.tensor(result["epoch_losses"])))


def test_the_regulariser_under_distributed_data_parallel_matches_a_plain_run():
    losses = []
    for world in (False, True):
        planned = apply_plan(Net().eval(), Plan((Decision("remove_block", "a:add"),)), x)
        loader = DataLoader(TensorDataset(x[0], torch.arange(8) % 3), batch_size=4)
        if world:
            torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
        try:
            losses.append(train(planned, loader, TrainConfig(progress=False), 2, seed=0, find_unused_parameters=True,
                                regulariser=Lacoot(weight=5.0).regulariser(planned, x))["epoch_losses"])
        finally:
            if world:
                torch.distributed.destroy_process_group()
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_removal_takes_the_nearest_block_first_and_keeps_the_far_one():
    model = Net(scales=(5.0, 0.01)).eval()
    planned = apply_plan(model, Plan(), x)
    inputs = StepInputs(x, [x, (x[0] * 2,)], None, None)
    candidates = Lacoot().candidates(planned_graph(planned, x), planned, inputs)
    assert [choice.target for choice in candidates] == ["b", "a"]
    assert candidates[0].score < 0.05 * candidates[1].score
    distances = block_distances(model, x, [x, (x[0] * 2,)])
    assert distances == {choice.target: choice.score for choice in candidates}
    first = Lacoot().choose(planned, inputs, 1)
    assert [choice.decisions for choice in first] == [(Decision("remove_block", "b:add"),)]
    removed = apply_plan(planned, Plan(first[0].decisions), x)
    compressed = fxcompress.compress(removed, x)
    without_b = copy.deepcopy(model)
    without_b.b = nn.Identity()
    with torch.no_grad():
        assert relative_error(without_b(*x), compressed.module(*x)) <= 1e-5
    assert compressed.report.after.weight_layers == fxcompress.compress(without_b, x).report.after.weight_layers


def test_options_are_checked():
    assert Lacoot(weight=0).regulariser(apply_plan(Net().eval(), Plan(), x), x) is None
    for options in ({"weight": -1.0}, {"weight": float("nan")}, {"projections": 0}, {"projections": 2.5}):
        with pytest.raises(OptionError):
            Lacoot(**options)
    with pytest.raises(OptionError, match="needs calibration"):
        Lacoot().candidates(planned_graph(Net().eval(), x), Net().eval(), StepInputs(x, [], None, None))
    with pytest.raises(OptionError, match="> 0"):
        BlockDistanceRegulariser(apply_plan(Net().eval(), Plan(), x), x, weight=0)


def test_the_penalty_is_float32_under_autocast():
    planned = apply_plan(Net().eval(), Plan(), x).train()
    regulariser = BlockDistanceRegulariser(planned, x, weight=1.0)
    with regulariser.watching(planned):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            planned(*x)
        assert {output.dtype for _, _, output in regulariser.recorded} == {torch.bfloat16}
        assert regulariser.penalty().dtype == torch.float32


def _loop_data():
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(96, 3, 8, 8, generator=generator), torch.randint(0, 3, (96,), generator=generator)
    return SimpleNamespace(train=TensorDataset(images, labels), validation=TensorDataset(images[:32], labels[:32]),
                           test=TensorDataset(images[32:64], labels[32:64]))


@pytest.mark.parametrize("weight", [0.0, 5.0])
def test_the_loop_trains_then_removes_blocks_without_fine_tuning_and_resumes(weight, tmp_path):
    options = dict(method="lacoot", data=_loop_data(), train_config=TrainConfig(batch_size=16, progress=False),
                   method_options={"weight": weight}, dense_epochs=1, epochs_per_step=0, max_drop=1.0, progress=False)
    whole = fxcompress.prune(Net(scales=(1.0, 0.1)), x, steps=2, **options)
    steps = whole.trajectory.steps
    assert [step["blocks_removed"] for step in steps] == [0, 1, 2]
    assert steps[1]["chosen"] == ["b"]  # the nearer block (conv2 scaled by 0.1) goes first
    assert steps[1]["weight_layers"] == steps[0]["weight_layers"] - 2
    assert whole.trajectory.stopped == "2 steps done"
    fxcompress.prune(Net(scales=(1.0, 0.1)), x, steps=1, out=tmp_path, **options)
    resumed = fxcompress.prune(Net(scales=(1.0, 0.1)), x, steps=2, out=tmp_path, resume=True, **options)
    assert [step["validation"] for step in resumed.trajectory.steps] == [step["validation"] for step in steps]
    with torch.no_grad():
        assert torch.equal(resumed.model.eval()(x[0]), whole.model.eval()(x[0]))


def test_the_regulariser_changes_training_and_needs_the_built_in_trainer():
    data = _loop_data()
    losses = {}
    for weight in (0.0, 5.0):
        result = fxcompress.prune(Net(), x, method="lacoot", data=data, method_options={"weight": weight}, dense_epochs=1,
                                  steps=0, train_config=TrainConfig(batch_size=16, progress=False), progress=False)
        losses[weight] = result.model.a.conv2.weight.detach().clone()
    assert not torch.equal(losses[0.0], losses[5.0])
    with pytest.raises(OptionError, match="built-in trainer"):
        fxcompress.prune(Net(), x, method="lacoot", finetune=lambda model: None, evaluate=lambda model: 1.0)
    fxcompress.prune(Net(), x, method="lacoot", method_options={"weight": 0.0}, steps=1, finetune=lambda model: None,
                     evaluate=lambda model: 1.0, calibration=[x], progress=False)
