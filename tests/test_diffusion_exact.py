"""Diffusion denoisers from diffusers (a tiny random UNet2DModel, class-conditional or not, and a tiny DiT) through the
exact pipeline and the `depthprune` backend: outputs and short DDIM samplings stay within 1e-5 of the model run in
plain PyTorch, linearised activations merge what they unlock and equal the identity-substituted model, and the
denoisers compile whole (fullgraph) while a DDPM scheduler step does not."""
import copy

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress import Plan
from fxcompress.graph import annotate_names, normalize_path
from fxcompress.pipeline import activation_names
from helpers import assert_state_unchanged, dynamo_graph, relative_error, state_of
from loop_models import Denoiser

diffusers = pytest.importorskip("diffusers")

EXACT = 1e-5
STEPS = 5
BATCH, SIZE, CLASSES = 2, 32, 10


@pytest.fixture(scope="module", autouse=True)
def one_thread_for_the_module():
    """Tiny models in one thread, from before the module-scoped compressions (helpers.one_thread is per test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class UNetDenoiser(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, y=None):
        return self.unet(x, t, class_labels=y).sample


def tiny_unet(classes: int | None = None) -> nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=SIZE, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, num_class_embeds=classes).eval()


def tiny_dit() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=1, num_layers=2, sample_size=SIZE,
        patch_size=4, num_embeds_ada_norm=CLASSES, norm_num_groups=8).eval()


def inputs(seed: int, conditional: bool) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 1, SIZE, SIZE, generator=generator)
    t = torch.randint(0, 1000, (BATCH,), generator=generator)
    y = torch.randint(0, CLASSES, (BATCH,), generator=generator)
    return (x, t, y) if conditional else (x, t)


# name -> (the wrapped denoiser, whether it takes class labels). diffusers' Upsample2D branches on batch >= 64, so
# torch.export refuses an unbounded dynamic batch on the UNet: fixing it up front saves compress a failed export.
DENOISERS = {
    "unet": (lambda: UNetDenoiser(tiny_unet()).eval(), False),
    "unet-class": (lambda: UNetDenoiser(tiny_unet(CLASSES)).eval(), True),
    "dit": (lambda: Denoiser(tiny_dit()).eval(), True),
}
DYNAMIC_BATCH = {"unet": False, "unet-class": False, "dit": None}


@pytest.fixture(scope="module", params=list(DENOISERS))
def compressed(request):
    """(denoiser, conditional, the caller's state before compress, compress's result) per denoiser."""
    make, conditional = DENOISERS[request.param]
    model = make()
    before = state_of(model)
    result = fxcompress.compress(model, inputs(0, conditional), dynamic_batch=DYNAMIC_BATCH[request.param])
    return model, conditional, before, result


def test_compress_keeps_the_denoiser_output_on_fresh_inputs_and_the_callers_weights(compressed):
    model, conditional, before, result = compressed
    fresh = inputs(1, conditional)
    assert not torch.equal(fresh[1], inputs(0, conditional)[1])
    with torch.no_grad():
        assert relative_error(model(*fresh), result.module(*fresh)) <= EXACT
    assert_state_unchanged(before, model)


def ddim_sample(denoiser, noise: torch.Tensor, labels: tuple) -> torch.Tensor:
    """A deterministic DDIM sampling (eta 0) of STEPS steps from `noise`."""
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(STEPS)
    x = noise
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(denoiser(x, t.expand(len(x)), *labels), t, x).prev_sample
    return x


def test_ddim_samples_of_the_compressed_denoiser_equal_the_originals(compressed):
    model, conditional, _, result = compressed
    noise = torch.randn(BATCH, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    labels = (torch.tensor([3, 7]),) if conditional else ()
    expected = ddim_sample(model, noise, labels)
    assert relative_error(noise, expected) > 0.1  # the sampler moved the noise
    assert relative_error(expected, ddim_sample(result.module, noise, labels)) <= EXACT


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_depthprune_compiles_the_wrapped_denoiser_whole_and_keeps_its_output(name):
    make, conditional = DENOISERS[name]
    model = make()
    reports = []
    compiled = torch.compile(model, backend="depthprune", fullgraph=True,
                             options={"lowering": "eager", "on_report": reports.append})
    with torch.no_grad():
        for seed in (0, 1):
            fresh = inputs(seed, conditional)
            assert relative_error(model(*fresh), compiled(*fresh)) <= EXACT
    assert len(reports) == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["unet", "dit"])
def test_depthprune_on_inductor_keeps_the_denoiser_output(name):
    make, conditional = DENOISERS[name]
    model = make()
    compiled = torch.compile(model, backend="depthprune", fullgraph=True)
    fresh = inputs(1, conditional)
    with torch.no_grad():
        assert relative_error(model(*fresh), compiled(*fresh)) <= EXACT


def test_depthprune_s_data_free_criterion_linearises_nothing_without_batchnorm():
    """criterion="bn" reads BatchNorm statistics; GroupNorm and LayerNorm normalise per sample and give none."""
    model = DENOISERS["dit"][0]()
    reports = []
    compiled = torch.compile(model, backend="depthprune", fullgraph=True,
                             options={"lowering": "eager", "criterion": "bn", "on_report": reports.append})
    fresh = inputs(1, conditional=True)
    with torch.no_grad():
        assert relative_error(model(*fresh), compiled(*fresh)) <= EXACT
    assert {rewrite.pass_name for rewrite in reports[0].rewrites} == {"cleanup"}


@pytest.mark.parametrize("make,call", [
    (lambda: tiny_unet(CLASSES), lambda model, x, t, y: model(x, t, class_labels=y)),
    (tiny_dit, lambda model, x, t, y: model(x, timestep=t, class_labels=y)),
], ids=["unet-class", "dit"])
def test_depthprune_compiles_the_raw_diffusers_model_with_its_dataclass_output(make, call):
    model = make()
    compiled = torch.compile(model, backend="depthprune", fullgraph=True, options={"lowering": "eager"})
    with torch.no_grad():
        for seed in (0, 1):
            x, t, y = inputs(seed, conditional=True)
            expected, actual = call(model, x, t, y), call(compiled, x, t, y)
            assert type(actual) is type(expected)
            assert relative_error(expected.sample, actual.sample) <= EXACT


@pytest.mark.parametrize("path,expected", [
    ("L['self'].unet.__dict__['_modules']['down_blocks'].0.resnets.0.time_emb_proj",
     "unet.down_blocks.0.resnets.0.time_emb_proj"),
    ("L['self'].__dict__['_modules']['transformer_blocks'].1.ff.net.0", "transformer_blocks.1.ff.net.0"),
    ("L['self']._modules['layers'][0]", "layers.0"),
])
def test_dynamo_module_paths_through_a_modules_dict_are_normalised(path, expected):
    """diffusers' ModelMixin defines __getattr__, so dynamo reaches its submodules through `__dict__['_modules']`."""
    assert normalize_path(path) == expected


def test_the_dits_activations_have_the_same_stable_names_under_export_and_dynamo():
    model = DENOISERS["dit"][0]()
    example = inputs(0, conditional=True)
    gm, _ = dynamo_graph(model, example)
    annotate_names(gm)
    assert activation_names(gm) == fxcompress.activation_names(model, example)


# Linearising is approximate by design: the result must equal the model with those activations replaced by identity
# in plain PyTorch, differ from the original, and merge the linears the activation separated.
def gelu_to_identity(dit: nn.Module, block: int) -> None:
    dit.transformer_blocks[block].ff.net[0].gelu = lambda hidden: hidden  # diffusers' GELU: proj, then self.gelu


DIM, HIDDEN, TOKENS = 32, 128, (SIZE // 4) ** 2  # the tiny DiT's width, FFN width and patches


def check_ffn_collapse(model, reference, linearised, reports: list) -> None:
    fresh = inputs(1, conditional=True)
    with torch.no_grad():
        expected, original, actual = reference(*fresh), model(*fresh), linearised(*fresh)
    assert relative_error(expected, original) > 1e-3  # the GELUs mattered
    assert relative_error(expected, actual) <= 1e-4
    ffn = [rewrite for rewrite in reports[0].rewrites if rewrite.pass_name == "merge_linear_chain"]
    assert [rewrite.sources[-1].split(":")[0] for rewrite in ffn] == \
        [f"dit.transformer_blocks.{block}.ff.net.2" for block in (0, 1)]
    for rewrite in ffn:  # d -> 4d -> d became one d -> d linear: 8x fewer MACs
        assert rewrite.macs_before == BATCH * TOKENS * 2 * DIM * HIDDEN
        assert rewrite.macs_after == BATCH * TOKENS * DIM * DIM


DIT_GELUS = Plan.linearize([f"dit.transformer_blocks.{block}.ff.net.0:gelu" for block in (0, 1)])


def dit_and_reference() -> tuple[nn.Module, nn.Module]:
    model = DENOISERS["dit"][0]()
    reference = copy.deepcopy(model)
    for block in (0, 1):
        gelu_to_identity(reference.dit, block)
    return model, reference


def test_a_linearised_dit_ffn_gelu_collapses_the_ffn_into_one_linear():
    model, reference = dit_and_reference()
    result = fxcompress.compress(model, inputs(0, conditional=True), plan=DIT_GELUS)
    check_ffn_collapse(model, reference, result.module, [result.report])
    assert result.report.after.weight_layers == result.report.before.weight_layers - 2


def test_depthprune_with_a_plan_linearises_the_dit_ffn_gelus_and_collapses_the_ffns():
    model, reference = dit_and_reference()
    reports = []
    compiled = torch.compile(model, backend="depthprune", fullgraph=True,
                             options={"lowering": "eager", "plan": DIT_GELUS, "on_report": reports.append})
    check_ffn_collapse(model, reference, compiled, reports)


def test_a_linearised_unet_time_embedding_silu_merges_its_two_linears():
    model = DENOISERS["unet"][0]()
    reference = copy.deepcopy(model)
    reference.unet.time_embedding.act = nn.Identity()
    example = inputs(0, conditional=False)
    result = fxcompress.compress(model, example, plan=Plan.linearize(["unet.time_embedding.act:silu"]),
                                 dynamic_batch=False)
    fresh = inputs(1, conditional=False)
    with torch.no_grad():
        expected, original, actual = reference(*fresh), model(*fresh), result.module(*fresh)
    assert relative_error(expected, original) > 1e-3
    assert relative_error(expected, actual) <= 1e-4
    merges = [rewrite for rewrite in result.report.rewrites if rewrite.pass_name == "merge_linear_chain"]
    assert [rewrite.sources for rewrite in merges] == [("unet.time_embedding.linear_1:linear",
                                                        "unet.time_embedding.linear_2:linear")]
    # 16 -> 64 -> 64 became 16 -> 64, per sample
    assert (merges[0].macs_before, merges[0].macs_after) == (BATCH * (16 * 64 + 64 * 64), BATCH * 16 * 64)


def test_the_exact_passes_merge_no_weight_layer_of_the_denoisers(compressed):
    """GroupNorm/LayerNorm, SiLU/GELU, fan-outs and broadcast adds separate every pair of convs or linears."""
    _, _, _, result = compressed
    assert {rewrite.pass_name for rewrite in result.report.rewrites} == {"cleanup"}  # eval-mode dropouts only
    assert result.report.after.weight_layers == result.report.before.weight_layers


def ddim_loop(denoiser, scheduler, x, labels, timesteps: list[int]):
    for t in timesteps:
        x = scheduler.step(denoiser(x, torch.full((len(x),), t), *labels), t, x).prev_sample
    return x


def test_a_ddim_loop_with_python_int_timesteps_compiles_whole_on_depthprune():
    """With timesteps as Python ints, DDIMScheduler.step has no tensor branch: the loop unrolls into one graph."""
    model = DENOISERS["dit"][0]()
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(3)
    timesteps = scheduler.timesteps.tolist()
    x = torch.randn(BATCH, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    labels = (torch.tensor([3, 7]),)
    compiled = torch.compile(ddim_loop, backend="depthprune", fullgraph=True, options={"lowering": "eager"})
    with torch.no_grad():
        expected = ddim_loop(model, scheduler, x, labels, timesteps)
        assert relative_error(expected, compiled(model, scheduler, x, labels, timesteps)) <= EXACT


def test_a_ddpm_scheduler_step_breaks_the_graph():
    """DDPMScheduler.step looks its timestep up with nonzero() and branches on tensors: not one graph."""
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(STEPS)
    sample = torch.randn(BATCH, 1, SIZE, SIZE)

    def step(eps, t, x):
        return scheduler.step(eps, t, x).prev_sample

    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(step, backend="eager", fullgraph=True)(sample, scheduler.timesteps[0], sample)
