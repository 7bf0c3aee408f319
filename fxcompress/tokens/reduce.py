"""reduce_tokens: a copy of a ViT whose encoder layers reduce tokens after the scheduled layers.

Module substitution, ToMe-style: each encoder layer from the first reducing one on gets a subclass of its
own class (so isinstance checks and output hooks, e.g. transformers' hidden-state recording, still see
it) whose forward runs the original layer, or the family adapter's re-run of it where keys, the CLS
attention or the proportional-attention bias are needed, and then reduces the tokens. The layers share
one small state per forward (token sizes and positions), reset by the first reducing layer, cleared by
the last patched one. A layer that neither reduces nor needs the bias runs its original forward, so ratio
0 is exactly the identity.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..capture import private_copy
from ..errors import OptionError
from ..token_merge import MATCHING, Step, TokenSet, attention_bias, reduce
from .config import TokenConfig
from .families import Encoder, find_encoder

_PATCHED: dict[type, type] = {}


@dataclass
class _Shared:
    schedule: dict[int, int]
    tokens: TokenSet | None = None


class LayerReducer:
    """Held by a patched layer: where it sits in the encoder and what to do after it."""

    def __init__(self, index: int, first: int, last: int, encoder: Encoder, config: TokenConfig, shared: _Shared,
                 original_forward):
        self.index, self.first, self.last = index, first, last
        self.encoder, self.config, self.shared = encoder, config, shared
        self.original_forward = original_forward

    def __call__(self, layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        config, shared, protected = self.config, self.shared, self.encoder.protected
        if self.index == self.first:
            shared.schedule = config.schedule(x.shape[1], len(self.encoder.layers), protected)
            shared.tokens = None
        target = shared.schedule.get(self.index)
        tokens = shared.tokens
        matching = target is not None and config.method in MATCHING
        biased = config.proportional_attention and tokens is not None
        keys = cls = None
        if matching or biased:
            if any(isinstance(a, torch.Tensor) for a in (*args, *kwargs.values())):
                raise OptionError("token reduction does not support attention masks in the vision encoder")
            bias = attention_bias(tokens.size, x.dtype) if biased else None
            x, keys, cls = self.encoder.family.forward(layer, x, bias, matching and config.alpha > 0)
        else:
            x = self.original_forward(layer, x, *args, **kwargs)
        if tokens is not None:
            tokens = TokenSet(x, tokens.size, tokens.position)
        if target is not None:
            step = Step(target, protected, keys, cls, config.alpha)
            tokens = reduce(tokens or TokenSet.of(x), config.method, step, config.restore_order)
        shared.tokens = None if self.index == self.last else tokens
        return x if tokens is None else tokens.x


def _patched_class(cls: type) -> type:
    if cls not in _PATCHED:
        def forward(self, x, *args, **kwargs):
            return self._fxcompress_tokens(self, x, args, kwargs)

        _PATCHED[cls] = type(f"TokenReduced{cls.__name__}", (cls,), {"forward": forward})
    return _PATCHED[cls]


def reduce_tokens(model: nn.Module, config: TokenConfig | dict | None = None, **options) -> nn.Module:
    """A copy of `model` that reduces its vision encoder's tokens as `config` (or keyword options) says.

    The caller's model is untouched. Supported: torchvision and timm `VisionTransformer`, transformers
    `CLIPVisionModel` / `ViTModel` (and models that contain one, e.g. a LLaVA-style vision tower).
    """
    if config is not None and options:
        raise OptionError("pass either a token config or keyword options, not both")
    config = TokenConfig.from_options(config if config is not None else options)
    encoder = find_encoder(model, config.encoder)
    if any(hasattr(layer, "_fxcompress_tokens") for layer in encoder.layers):
        raise OptionError(f"{type(model).__name__} already reduces tokens; start again from the original model")
    model = private_copy(model)
    encoder = find_encoder(model, encoder.path)
    if config.is_identity:
        return model
    reducing = config.layer_indices(len(encoder.layers))
    first = reducing[0]
    last = len(encoder.layers) - 1 if config.proportional_attention else reducing[-1]
    shared = _Shared({})
    for index in range(first, last + 1):
        layer = encoder.layers[index]
        original = type(layer)
        layer.__class__ = _patched_class(original)
        layer._fxcompress_tokens = LayerReducer(index, first, last, encoder, config, shared, original.forward)
    return model
