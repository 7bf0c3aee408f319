"""One small adapter per ViT family: find the encoder's layers and run a layer exposing its keys.

Attention is one opaque op in these models, so the adapter re-runs a layer from its own submodules with
`scaled_dot_product_attention`, which lets it (a) return the head-averaged keys that FOLDER/ToMe match on,
(b) return the CLS token's attention for the alpha penalty, and (c) add the proportional-attention bias.
Families are recognised by the block class's module and name, so nothing optional is imported here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OptionError
from ..token_merge import head_average


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: torch.Tensor | None,
           need_cls: bool):
    """q, k, v `[B, H, N, d]` -> (output `[B, N, H*d]`, head-averaged keys `[B, N, d]`, CLS attention `[B, N]`)."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    cls = None
    if need_cls:
        logits = (q[:, :, :1] @ k.transpose(-2, -1)) * scale
        if bias is not None:
            logits = logits + bias
        cls = logits.softmax(dim=-1).mean(dim=1)[:, 0]
    return out.transpose(1, 2).flatten(2), head_average(k), cls


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def _torchvision(block: nn.Module, x: torch.Tensor, bias, need_cls: bool):
    attention = block.self_attention
    h = block.ln_1(x)
    qkv = F.linear(h, attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)
    out, keys, cls = attend(*(_heads(t, attention.num_heads) for t in qkv), attention.head_dim ** -0.5, bias,
                            need_cls)
    x = x + block.dropout(attention.out_proj(out))
    return x + block.mlp(block.ln_2(x)), keys, cls


def _timm(block: nn.Module, x: torch.Tensor, bias, need_cls: bool):
    attention = block.attn
    h = block.norm1(x)
    q, k, v = _heads(attention.qkv(h), 3 * attention.num_heads).chunk(3, dim=1)
    q, k = attention.q_norm(q), attention.k_norm(k)
    out, keys, cls = attend(q, k, v, attention.scale, bias, need_cls)
    out = attention.norm(out)
    if getattr(attention, "gate", None) is not None:
        out = out * attention.gate(h).sigmoid()
    x = x + block.drop_path1(block.ls1(attention.proj_drop(attention.proj(out))))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x)))), keys, cls


def _hf_attention(attention: nn.Module, h: torch.Tensor, heads: int, scale: float, bias, need_cls: bool):
    q, k, v = (_heads(proj(h), heads) for proj in (attention.q_proj, attention.k_proj, attention.v_proj))
    return attend(q, k, v, scale, bias, need_cls)


def _clip(block: nn.Module, x: torch.Tensor, bias, need_cls: bool):
    attention = block.self_attn
    out, keys, cls = _hf_attention(attention, block.layer_norm1(x), attention.num_heads, attention.scale, bias,
                                   need_cls)
    x = x + attention.out_proj(out)
    return x + block.mlp(block.layer_norm2(x)), keys, cls


def _hf_vit(block: nn.Module, x: torch.Tensor, bias, need_cls: bool):
    attention = block.attention
    out, keys, cls = _hf_attention(attention, block.layernorm_before(x), attention.num_attention_heads,
                                   attention.scaling, bias, need_cls)
    x = x + block.dropout(attention.o_proj(out))
    return x + block.dropout(block.mlp(block.layernorm_after(x))), keys, cls


@dataclass(frozen=True)
class Family:
    name: str
    module: str  # Python module that defines the encoder block class
    block: str  # the block class name
    forward: Callable  # (block, x, attention bias, need CLS attention) -> (x, keys, CLS attention)
    attention: str = ""  # required class name of the block's attention submodule, where several exist

    def owns(self, module: nn.Module) -> bool:
        return any(cls.__module__ == self.module and cls.__name__ == self.block for cls in type(module).__mro__)


FAMILIES = (
    Family("torchvision", "torchvision.models.vision_transformer", "EncoderBlock", _torchvision),
    Family("timm", "timm.models.vision_transformer", "Block", _timm, attention="Attention"),
    Family("clip", "transformers.models.clip.modeling_clip", "CLIPEncoderLayer", _clip),
    Family("vit", "transformers.models.vit.modeling_vit", "ViTLayer", _hf_vit),
)
SUPPORTED = "torchvision VisionTransformer, timm VisionTransformer, transformers CLIPVisionModel / ViTModel"


def choose_encoder(paths: list[str], path: str, model_name: str) -> str:
    """`path` if given, else the only encoder, else the only one whose path says "vision"."""
    if path:
        if path not in paths:
            raise OptionError(f"token option 'encoder' {path!r} is not an encoder here; found: {', '.join(paths)}")
        return path
    candidates = [p for p in paths if "vision" in p] if len(paths) > 1 else paths
    if len(candidates) != 1:
        raise OptionError(f"{model_name} has several encoders ({', '.join(paths)}); name one with the token "
                          "option 'encoder'")
    return candidates[0]


@dataclass(frozen=True)
class Encoder:
    family: Family
    path: str  # module path of the list of layers
    layers: list[nn.Module]
    protected: int  # prefix tokens (CLS, registers) never merged


def find_encoder(model: nn.Module, path: str = "") -> Encoder:
    """The model's (vision) encoder layers. With several candidate encoders, the one whose path says
    "vision" is taken; `path` names one explicitly."""
    found: dict[str, tuple[Family, list[nn.Module]]] = {}
    for name, module in model.named_modules():
        family = next((f for f in FAMILIES if f.owns(module)), None)
        if family is not None:
            parent = name.rpartition(".")[0]
            found.setdefault(parent, (family, []))[1].append(module)
    if not found:
        raise OptionError(f"no supported ViT encoder in {type(model).__name__}; supported: {SUPPORTED}")
    chosen = choose_encoder(list(found), path, type(model).__name__)
    family, layers = found[chosen]
    if family.attention:
        other = {type(getattr(layer, "attn", None)).__name__ for layer in layers} - {family.attention}
        if other:
            raise OptionError(f"{family.name} blocks with attention {', '.join(sorted(other))} are not supported "
                              f"(only {family.attention})")
    owner = model.get_submodule(chosen.rpartition(".")[0]) if "." in chosen else model
    protected = getattr(owner, "num_prefix_tokens", 1)
    return Encoder(family, chosen, layers, protected)
