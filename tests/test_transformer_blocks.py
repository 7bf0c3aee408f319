"""Transformer layers as LaCoOT blocks (attention and MLP removed together) and LaCoOT on a diffusers DiT trained by
the loop with the denoising objective. References: the same models with layers deleted by hand, hooks on the layer
modules, POT called directly, and a DDPM loss written out here."""
import copy
import json
import subprocess
import sys
from pathlib import Path
import ot
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader

import fxcompress
from fxcompress.errors import OptionError
from fxcompress.blocks import monitored_blocks
from fxcompress.finetune.lacoot import BlockDistanceRegulariser, block_distances
from fxcompress.finetune.methods import Lacoot, StepInputs
from fxcompress.finetune.objectives import Denoising
from fxcompress.finetune.run_folder import RunFolder
from fxcompress.trainable import apply_plan, plan_of, planned_graph
from fxcompress.finetune.trainer import TrainConfig, train
from fxcompress.plan import Plan
from helpers import relative_error
from loop_models import denoiser_inputs, denoising_task, noise_schedule, tiny_dit

diffusers = pytest.importorskip("diffusers")


def torchvision_vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=3, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=5).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision initialises the head to zeros
    return model


def timm_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=3,
                                                            num_heads=2, mlp_ratio=2.0, num_classes=5).eval()


VITS = {"torchvision": (torchvision_vit, lambda model: model.encoder.layers, "encoder.layers.encoder_layer_{}"),
        "timm": (timm_vit, lambda model: model.blocks, "blocks.{}")}
images = (torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1)),)


def without_layer(model: nn.Module, layers, index: int) -> nn.Module:
    """A copy of `model` whose layer `index` (in the container `layers` returns) is the identity."""
    copied = copy.deepcopy(model)
    container = layers(copied)
    container[index] = nn.Identity()
    return copied


@pytest.mark.parametrize("family", list(VITS))
def test_a_vit_layer_is_one_block_of_its_attention_and_mlp_adds(family):
    build, _, name = VITS[family]
    blocks = monitored_blocks(planned_graph(build(), images))
    assert list(blocks) == [name.format(i) for i in range(3)]
    assert all(len(adds) == 2 and adds[0].startswith(block) for block, adds in blocks.items())


@pytest.mark.parametrize("family", list(VITS))
def test_block_distances_are_between_the_layer_input_and_output(family):
    build, layers, name = VITS[family]
    model = build()
    seen = {}
    hooks = [layer.register_forward_hook(lambda module, args, out, i=i: seen.update({i: (args[0], out)}))
             for i, layer in enumerate(layers(model))]
    with torch.no_grad():
        model(*images)
    for hook in hooks:
        hook.remove()
    distances = block_distances(model, images, [images])
    for i, (inputs, outputs) in seen.items():
        direct = ot.max_sliced_wasserstein_distance(inputs.flatten(1), outputs.flatten(1), n_projections=50, p=2,
                                                    seed=0)
        assert distances[name.format(i)] == pytest.approx(float(direct), rel=1e-5)


@pytest.mark.parametrize("family", list(VITS))
def test_removing_the_nearest_layer_drops_its_attention_and_mlp(family):
    build, layers, name = VITS[family]
    model = build()
    with torch.no_grad():  # layer 1 made nearly the identity: its two residual branches scaled down
        for parameter in layers(model)[1].parameters():
            if parameter.dim() == 2:
                parameter.mul_(0.05)
    planned = apply_plan(model, Plan(), images)
    chosen, = Lacoot().choose(planned, StepInputs(images, [images], None, None), 1)
    assert chosen.target == name.format(1) and len(chosen.decisions) == 2
    removed = fxcompress.compress(apply_plan(planned, Plan(chosen.decisions), images), images)
    reference = without_layer(model, layers, 1)
    fresh = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        assert relative_error(reference(fresh), removed.module(fresh)) <= 1e-5
    assert removed.report.after.weight_layers == fxcompress.compress(reference, images).report.after.weight_layers


def test_the_penalty_of_a_vit_is_the_mean_layer_distance():
    model = apply_plan(torchvision_vit(), Plan(), images).train()
    regulariser = BlockDistanceRegulariser(model, images, weight=2.0)
    seen = []
    hooks = [layer.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
             for layer in model.encoder.layers]
    torch.manual_seed(5)
    with regulariser.watching(model):
        model(*images)
        penalty = regulariser.penalty()
    for hook in hooks:
        hook.remove()
    torch.manual_seed(5)
    seeds = [int(torch.randint(2 ** 31 - 1, ())) for _ in seen]
    direct = torch.stack([ot.max_sliced_wasserstein_distance(i.flatten(1), o.flatten(1), n_projections=50, p=2,
                                                             seed=seed) for (i, o), seed in zip(seen, seeds)])
    assert penalty.item() == pytest.approx(2.0 * direct.mean().item(), rel=1e-5)


SCHEDULE = noise_schedule()


@torch.no_grad()
def sample(denoiser, labels: torch.Tensor, steps: int = 4, seed: int = 0) -> torch.Tensor:
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=100)
    scheduler.set_timesteps(steps)
    images = torch.randn(len(labels), 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    for t in scheduler.timesteps:
        images = scheduler.step(denoiser(images, t.repeat(len(labels)), labels), t, images).prev_sample
    return images


def test_the_denoising_loss_and_score_are_the_ddpm_error_written_out():
    objective = Denoising(SCHEDULE.alphas_cumprod, seed=3)
    model, data = tiny_dit(), denoising_task()
    clean, labels = data.validation.tensors
    generator = torch.Generator().manual_seed(3)
    draws = [(torch.randint(100, (1,), generator=generator), torch.randn(1, 16, 16, generator=generator))
             for _ in range(16)]
    t, noise = torch.cat([t for t, _ in draws]), torch.stack([n for _, n in draws])
    alpha = SCHEDULE.alphas_cumprod[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        expected = F.mse_loss(model(alpha.sqrt() * clean + (1 - alpha).sqrt() * noise, t, labels), noise)
    assert objective.score(model, data.validation) == pytest.approx(-expected.item(), rel=1e-5)
    batched = objective.score(model, DataLoader(data.validation, batch_size=5))
    assert batched == pytest.approx(-expected.item(), rel=1e-5)
    torch.manual_seed(4)
    with torch.no_grad():
        loss = objective.loss(model, clean, labels)
    torch.manual_seed(4)
    t = torch.randint(100, (16,))
    noise = torch.randn(clean.shape)
    alpha = SCHEDULE.alphas_cumprod[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        assert loss.item() == pytest.approx(F.mse_loss(model(alpha.sqrt() * clean + (1 - alpha).sqrt() * noise, t,
                                                             labels), noise).item(), rel=1e-5)


def test_lacoot_on_a_dit_removes_the_chosen_layer_and_the_model_still_samples(tmp_path):
    model = tiny_dit()
    with torch.no_grad():  # block 2 nearly the identity
        for parameter in model.dit.transformer_blocks[2].parameters():
            if parameter.dim() == 2:
                parameter.mul_(0.05)
    data, example = denoising_task(), denoiser_inputs()
    objective = Denoising(SCHEDULE.alphas_cumprod)
    result = fxcompress.prune(model, example, method="lacoot", data=data, objective=objective, method_options={"weight": 1.0},
                              epochs_per_step=0, steps=1, max_drop=1.0, progress=False, out=tmp_path,
                              save_steps=True,
                              train_config=TrainConfig(batch_size=8, optimizer="adamw", lr=1e-3, progress=False))
    steps = result.trajectory.steps
    assert steps[1]["chosen"] == ["dit.transformer_blocks.2"] and steps[1]["blocks_removed"] == 1
    assert steps[1]["validation"] < 0 and steps[1]["validation"] == objective.score(result.model, data.validation)
    saved = [RunFolder(tmp_path).step_model(step) for step in (0, 1)]
    assert [len(plan_of(step).decisions) for step in saved] == [0, 2]
    reference = copy.deepcopy(model)
    del reference.dit.transformer_blocks[2]
    compressed = fxcompress.compress(result.model, example)
    fresh = denoiser_inputs(4)
    labels = torch.arange(4)
    with torch.no_grad():
        assert relative_error(reference(*fresh), compressed.module(*fresh)) <= 1e-5
        removed, original = sample(compressed.module, labels), sample(model, labels)
    assert removed.shape == (4, 1, 16, 16) and torch.isfinite(removed).all()
    assert relative_error(sample(reference, labels), removed) <= 1e-5
    assert not torch.allclose(removed, original, atol=1e-3)


def test_the_denoising_objective_trains_with_the_lacoot_penalty():
    model = apply_plan(tiny_dit(), Plan(), denoiser_inputs())
    before = copy.deepcopy(model.dit.transformer_blocks[0].ff.net[2].weight)
    regulariser = Lacoot(weight=1.0).regulariser(model, denoiser_inputs())
    assert list(regulariser.blocks) == [f"dit.transformer_blocks.{i}" for i in range(3)]
    result = train(model, denoising_task().train, TrainConfig(batch_size=8, max_batches=2, progress=False), 1, seed=0,
                   regulariser=regulariser, objective=Denoising(SCHEDULE.alphas_cumprod))
    assert torch.isfinite(torch.tensor(result["epoch_losses"])).all()
    assert not torch.equal(before, model.dit.transformer_blocks[0].ff.net[2].weight)


def test_the_denoising_objective_refuses_what_it_cannot_train():
    with pytest.raises(OptionError, match="alphas_cumprod"):
        Denoising(torch.tensor([0.5, 1.5]))
    with pytest.raises(OptionError, match="distils"):
        fxcompress.prune(tiny_dit(), denoiser_inputs(), method="dsd2", data=denoising_task(),
                         objective=Denoising(SCHEDULE.alphas_cumprod), progress=False)
    with pytest.raises(OptionError, match="built-in trainer"):
        fxcompress.prune(tiny_dit(), denoiser_inputs(), method="easier", finetune=lambda model: None,
                         evaluate=lambda model: 1.0, objective=Denoising(SCHEDULE.alphas_cumprod), progress=False)


def test_the_prune_command_takes_a_denoising_task(tmp_path):
    command = [sys.executable, "-m", "fxcompress.cli", "prune", "loop_models:tiny_dit", "--data",
               "loop_models:denoising_task", "--method", "lacoot", "--lacoot-weight", "1", "--steps", "1",
               "--epochs-per-step", "0", "--max-drop", "1", "--batch-size", "8", "--lowering", "eager",
               "--out", str(tmp_path / "run")]
    done = subprocess.run(command, cwd=Path(__file__).parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    trajectory = json.loads((tmp_path / "run" / "trajectory.json").read_text())
    assert [step["blocks_removed"] for step in trajectory["steps"]] == [0, 1]
    assert trajectory["training"]["objective"]["name"] == "denoising"
    assert len(Plan.load(tmp_path / "run" / "plan.json").decisions) == 2
    refused = subprocess.run(command[:6] + ["loop_models:tiny_dit"] + command[7:-1] + [str(tmp_path / "other")],
                             cwd=Path(__file__).parent, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "without train, validation, test, example" in refused.stderr


def test_only_restricts_the_choice_to_the_dit_mlp_gelus():
    objective = Denoising(SCHEDULE.alphas_cumprod)
    options = dict(data=denoising_task(), objective=objective, epochs_per_step=0, steps=1, max_drop=1.0,
                   progress=False, train_config=TrainConfig(batch_size=8, progress=False))
    result = fxcompress.prune(tiny_dit(), denoiser_inputs(), method="easier", only=r"\.ff\.", **options)
    chosen, = result.trajectory.steps[1]["chosen"]
    assert chosen.startswith("dit.transformer_blocks.") and ".ff." in chosen and chosen.endswith(":gelu")
    assert result.trajectory.steps[1]["macs_ratio"] < 0.9  # the MLP collapsed into one linear
    with pytest.raises(OptionError, match="regular expression"):
        fxcompress.prune(tiny_dit(), denoiser_inputs(), method="easier", only="(", **options)
    with pytest.raises(OptionError, match="does not apply"):
        fxcompress.prune(tiny_dit(), denoiser_inputs(), method="magnitude", only="ff", **options)
