"""Token reduction (FOLDER, ToMe schedule, pooling, random drop): math, families, compress and the backend."""
from __future__ import annotations

import pytest
import torch
import torchvision
from helpers import assert_state_unchanged, state_of

import fxcompress
from fxcompress import token_merge as tm
from fxcompress.errors import OptionError
from fxcompress.tokens import TokenConfig, find_encoder, reduce_tokens

IMAGE = 32  # 8 x 8 patches of 4 pixels + CLS = 65 tokens


def _nonzero_heads(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and not module.weight.any():
                module.weight.normal_(0, 0.2)
    return model.eval()


def torchvision_vit(layers: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return _nonzero_heads(torchvision.models.VisionTransformer(
        image_size=IMAGE, patch_size=4, num_layers=layers, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10))


def timm_vit() -> torch.nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return _nonzero_heads(timm.models.vision_transformer.VisionTransformer(
        img_size=IMAGE, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10, reg_tokens=2))


def clip_vision() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                           num_attention_heads=2, image_size=IMAGE, patch_size=4)
    return transformers.CLIPVisionModel(config).eval()


def hf_vit() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                    num_attention_heads=2, image_size=IMAGE, patch_size=4)
    return transformers.ViTModel(config).eval()


FAMILIES = {"torchvision": torchvision_vit, "timm": timm_vit, "clip": clip_vision, "vit": hf_vit}
IMAGES = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def run(name: str, model, images=IMAGES):
    """(main output, per-layer token counts of the encoder's outputs) for any family."""
    counts = []
    encoder = find_encoder(model)
    hooks = [layer.register_forward_hook(lambda m, i, o: counts.append(o.shape[1])) for layer in encoder.layers]
    with torch.no_grad():
        out = model(images) if name in ("torchvision", "timm") else model(pixel_values=images).pooler_output
    for hook in hooks:
        hook.remove()
    return out, counts


# --- math -------------------------------------------------------------------------------------------------

def test_fold_counts_follow_folder_rounds():
    assert tm.fold_counts(577, 193) == [289, 193]
    assert tm.fold_counts(197, 99) == [99]
    assert tm.fold_counts(65, 65) == []


@pytest.mark.parametrize("target", [64, 40, 33, 20, 2])
def test_fold_keeps_cls_and_sizes(target):
    x = torch.randn(3, 65, 8)
    tokens = tm.fold(tm.TokenSet.of(x), x, target)
    assert len(tokens) == target
    assert torch.equal(tokens.x[:, 0], x[:, 0])
    assert torch.equal(tokens.size.sum(dim=1), torch.full((3, 1), 65.0))
    assert torch.equal(tokens.position[:, 0], torch.zeros(3, dtype=torch.long))


def test_merge_is_size_weighted_average_of_the_most_similar_pair():
    x = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]]])  # CLS, then A B A B
    tokens = tm.TokenSet(x, torch.tensor([[[1.0], [3.0], [1.0], [1.0], [1.0]]]), torch.arange(5)[None])
    merged, _, _ = tm.merge_round(tokens, x, 1)
    expected = (3 * x[0, 1] + x[0, 2]) / 4  # A token 1 (size 3) goes into B token 2, its nearest
    assert torch.allclose(merged.x[0], torch.stack([x[0, 0], x[0, 3], expected, x[0, 4]]))
    assert merged.size[0, :, 0].tolist() == [1.0, 1.0, 4.0, 1.0]
    assert merged.position[0].tolist() == [0, 3, 1, 4]


def test_alpha_spares_tokens_the_cls_attends_to():
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.0, -1.0]]])  # A = (0, 2), B = (1, 3)
    importance = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    assert tm.bipartite_matching(metric, 1).source.tolist() == [[1]]  # A token 2 is the best match
    assert tm.bipartite_matching(metric, 1, importance, alpha=5.0).source.tolist() == [[0]]


def test_restore_order_sorts_by_position():
    x = torch.randn(2, 65, 4)
    tokens = tm.restore_order(tm.fold(tm.TokenSet.of(x), x, 20))
    assert torch.equal(tokens.position, tokens.position.sort(dim=1).values)


def test_pool_and_drop_counts():
    x = torch.randn(2, 65, 4)
    pooled = tm.pool(tm.TokenSet.of(x), 17)
    assert len(pooled) == tm.pool_count(65, 17) == 17
    assert torch.allclose(pooled.x[:, 1], x[:, [1, 2, 9, 10]].mean(dim=1))  # 2 x 2 cell of the 8 x 8 grid
    assert torch.equal(pooled.size.sum(dim=1), torch.full((2, 1), 65.0))
    dropped = tm.drop(tm.TokenSet.of(x), 20, generator=torch.Generator().manual_seed(0))
    assert len(dropped) == 20 and torch.equal(dropped.x, x.gather(1, dropped.position[..., None].expand(-1, -1, 4)))


def test_proportional_attention_equals_duplicated_tokens():
    """A token of size 2 attends like two copies of it: the bias log(size) is exact for identical tokens."""
    block = find_encoder(torchvision_vit()).layers[1]
    family = find_encoder(torchvision_vit()).family
    x = torch.randn(1, 6, 32)
    duplicated = torch.cat([x, x[:, 3:4]], dim=1)
    size = torch.ones(1, 6, 1)
    size[0, 3] = 2
    with torch.no_grad():
        merged, _, _ = family.forward(block, x, tm.attention_bias(size, x.dtype), False)
        reference, _, _ = family.forward(block, duplicated, None, False)
    assert torch.allclose(merged, reference[:, :6], atol=1e-5)


# --- configuration ------------------------------------------------------------------------------------------

def test_config_errors_list_valid_choices():
    with pytest.raises(OptionError, match="valid: drop, folder, pool, tome"):
        TokenConfig(method="prune", ratio=0.5)
    with pytest.raises(OptionError, match="exactly one of 'ratio'"):
        TokenConfig(ratio=0.5, tokens=10)
    with pytest.raises(OptionError, match="valid: alpha"):
        TokenConfig.from_options({"ratio": 0.5, "r": 3})
    with pytest.raises(OptionError, match="encoder has 4 layers"):
        reduce_tokens(torchvision_vit(), layers=[7], ratio=0.5)
    with pytest.raises(OptionError, match="no supported ViT encoder"):
        reduce_tokens(torch.nn.Linear(2, 2), ratio=0.5)


def test_schedules():
    assert TokenConfig(ratio=384 / 576).schedule(577, 24, 1) == {23: 193}
    tome = TokenConfig(method="tome", ratio=0.5).schedule(65, 4, 1)
    assert tome == {0: 57, 1: 49, 2: 41, 3: 33}
    assert TokenConfig(method="pool", layers=(1,), ratio=0.75).schedule(65, 4, 1) == {1: 17}


# --- model families ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [name if name != "clip" else pytest.param(name, marks=pytest.mark.slow)
                                  for name in FAMILIES])
def test_ratio_zero_is_the_identity(name):
    model = FAMILIES[name]()
    reference, _ = run(name, model)
    out, _ = run(name, reduce_tokens(model, ratio=0.0))
    assert torch.equal(out, reference)
    out, _ = run(name, reduce_tokens(model, layers=[0, 1], tokens=1000, proportional_attention=True))
    assert torch.equal(out, reference)


@pytest.mark.parametrize("name", FAMILIES)
def test_layer_rerun_matches_the_original_layer(name):
    encoder = find_encoder(FAMILIES[name]())
    layer = encoder.layers[2]
    x = torch.randn(2, 64 + encoder.protected, 32)
    with torch.no_grad():
        reference = layer(x) if name in ("torchvision", "timm") else layer(x, None)
        out, keys, cls = encoder.family.forward(layer, x, None, True)
    assert torch.allclose(out, reference, atol=1e-5)
    assert keys.shape == (2, x.shape[1], 16) and torch.allclose(cls.sum(dim=1), torch.ones(2))


# Patch tokens left after each of the 4 layers when 0.66 of 64 (42) go: after layer 1, or spread over all
# layers (11, 11, 10, 10) for "tome"; "pool" keeps the nearest square grid (sqrt(22) -> 5 x 5).
PATCHES_AFTER_EACH_LAYER = {"folder": [64, 22, 22, 22], "drop": [64, 22, 22, 22], "pool": [64, 25, 25, 25],
                            "tome": [53, 42, 32, 22]}


@pytest.mark.parametrize("method", ["folder", "tome", "pool", "drop"])
@pytest.mark.parametrize("name", FAMILIES)
def test_families_follow_the_schedule_and_keep_their_output_shape(name, method):
    model = FAMILIES[name]()
    protected = find_encoder(model).protected
    state = state_of(model)
    options = {"method": method, "ratio": 0.66}
    if method == "folder":
        options.update(layers=[1], alpha=0.5, proportional_attention=True, restore_order=True)
    elif method in ("pool", "drop"):
        options.update(layers=[1])
    reduced = reduce_tokens(model, **options)
    reference, _ = run(name, model)
    out, counts = run(name, reduced)
    assert out.shape == reference.shape
    assert counts == [protected + patches for patches in PATCHES_AFTER_EACH_LAYER[method]]
    assert_state_unchanged(state, model)


def test_llava_placement_reduces_the_layer_the_language_model_reads():
    model = clip_vision()
    reduced = reduce_tokens(model, layers=[-2], ratio=0.75)
    with torch.no_grad():
        hidden = reduced(pixel_values=IMAGES, output_hidden_states=True).hidden_states
    assert [h.shape[1] for h in hidden] == [65, 65, 65, 17, 17]


def test_cls_is_never_merged():
    model = torchvision_vit()
    reduced = reduce_tokens(model, layers=[0], ratio=0.9)
    captured = {}
    find_encoder(reduced).layers[0].register_forward_hook(lambda m, i, o: captured.update(out=o))
    find_encoder(model).layers[0].register_forward_hook(lambda m, i, o: captured.update(ref=o))
    with torch.no_grad():
        reduced(IMAGES), model(IMAGES)
    assert captured["out"].shape[1] == 7 and torch.allclose(captured["out"][:, 0], captured["ref"][:, 0], atol=1e-5)


# --- compress and the backend ---------------------------------------------------------------------------------

def merge_by_hand(x: torch.Tensor, metric: torch.Tensor, remove: int) -> torch.Tensor:
    """One FOLDER/ToMe round written out token by token: the CLS token kept; the patch tokens split into even
    (A) and odd (B) positions; the `remove` A tokens whose best cosine match in B scores highest are averaged
    into that B token (all sizes 1 before the first round)."""
    out = []
    for tokens, keys in zip(x, metric.double()):
        cls, body, keys = tokens[0], tokens[1:], torch.nn.functional.normalize(keys[1:], dim=-1)
        a_side, b_side = range(0, len(body), 2), range(1, len(body), 2)
        best = {a: max(b_side, key=lambda b: keys[a] @ keys[b]) for a in a_side}
        merged_away = sorted(a_side, key=lambda a: -(keys[a] @ keys[best[a]]))[:remove]
        groups = {b: [b] for b in b_side}
        for a in merged_away:
            groups[best[a]].append(a)
        kept = [body[a] for a in a_side if a not in merged_away]
        out.append(torch.stack([cls, *kept, *(body[group].mean(dim=0) for group in groups.values())]))
    return torch.stack(out)


def folder_reference(model: torch.nn.Module, images: torch.Tensor, layer: int, remove: int) -> torch.Tensor:
    """torchvision's ViT forward written out, merging tokens after `layer` on that layer's head-averaged keys."""
    encoder, hidden = model.encoder, model.hidden_dim
    x = model._process_input(images)
    x = torch.cat([model.class_token.expand(len(x), -1, -1), x], dim=1) + encoder.pos_embedding
    for index, block in enumerate(encoder.layers):
        attention = block.self_attention
        keys = block.ln_1(x) @ attention.in_proj_weight[hidden:2 * hidden].T + attention.in_proj_bias[hidden:2 * hidden]
        x = block(x)
        if index == layer:
            x = merge_by_hand(x, keys.unflatten(-1, (attention.num_heads, -1)).mean(dim=2), remove)
    return model.heads(encoder.ln(x)[:, 0])


def test_compress_with_tokens_matches_a_hand_written_folder_round():
    model = torchvision_vit()
    state = state_of(model)
    result = fxcompress.compress(model, (IMAGES,), tokens={"layers": [1], "ratio": 0.25})
    with torch.no_grad():
        expected = folder_reference(model, IMAGES, layer=1, remove=16)  # 0.25 of the 64 patch tokens
        assert not torch.allclose(model(IMAGES), expected, atol=1e-3)
        assert torch.allclose(result.module(IMAGES), expected, atol=1e-5)
    assert_state_unchanged(state, model)


def test_backend_merges_tokens_in_the_dynamo_graph():
    model = torchvision_vit()
    reports = []
    compiled = torch.compile(model, backend="depthprune", options={
        "tokens": {"layers": [1], "ratio": 0.5}, "lowering": "eager", "on_report": reports.append})
    with torch.no_grad():
        out = compiled(IMAGES)
        reference = model(IMAGES)
    assert out.shape == reference.shape and not torch.equal(out, reference)
    report = reports[0]
    assert [r.pass_name for r in report.rewrites].count("merge_tokens") == 1
    assert report.after.macs < 0.85 * report.before.macs


@pytest.mark.slow
def test_backend_refuses_a_graph_with_the_token_count_baked_in():
    model = timm_vit()
    compiled = torch.compile(model, backend="depthprune", options={"tokens": {"layers": [1], "ratio": 0.5},
                                                                    "lowering": "eager"})
    with pytest.raises(Exception, match="token count 67 baked in"):
        with torch.no_grad():
            compiled(IMAGES)


def test_backend_refuses_options_that_need_keys():
    compiled = torch.compile(torchvision_vit(), backend="depthprune",
                             options={"tokens": {"ratio": 0.5, "alpha": 1.0}, "lowering": "eager"})
    with pytest.raises(Exception, match="reduce_tokens"):
        with torch.no_grad():
            compiled(IMAGES)


@pytest.mark.slow
def test_backend_merges_after_the_last_layer_of_a_transformers_tower():
    compiled = torch.compile(clip_vision(), backend="depthprune",
                             options={"tokens": {"layers": [-1], "tokens": 17}, "lowering": "eager"})
    with torch.no_grad():
        assert compiled(pixel_values=IMAGES).last_hidden_state.shape == (2, 17, 32)


def test_the_report_counts_the_macs_tokens_save():
    model = torchvision_vit()
    report = fxcompress.compress(model, (IMAGES,), tokens={"layers": [0], "ratio": 0.5}).report
    plain = fxcompress.compress(model, (IMAGES,)).report
    assert report.before.macs == plain.before.macs  # the model as given, before its tokens are reduced
    assert report.after.macs < 0.8 * plain.after.macs
