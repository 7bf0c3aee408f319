"""TokenConfig: which token reduction, where and how much; validated once, turned into a per-layer schedule."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import OptionError, finite_number, known_fields, valid_choice
from ..token_merge import REDUCERS, pool_count

METHODS = tuple(REDUCERS)


@dataclass(frozen=True)
class TokenConfig:
    """Token reduction settings.

    method: "folder" (bipartite matching with folding, in a few late layers), "tome" (the same matching
        spread over every layer), "pool" (grid average pooling) or "drop" (random drop), the last two as
        baselines.
    layers: encoder layer indices (negative counts from the end) after which tokens are reduced; default the
        last layer, or every layer for "tome". For LLaVA-style towers that read layer -2, pass (-2,).
    ratio: fraction of the unprotected (patch) tokens to remove, in [0, 1); or
    tokens: number of tokens (CLS included) to keep after the last reducing layer.
    alpha: penalty on merging tokens the CLS attends to ("folder" and "tome").
    proportional_attention: add log(size) to the attention logits of merged tokens in later layers.
    restore_order: put the tokens back into spatial order after each reduction.
    encoder: module path of the encoder's list of layers, when a model holds more than one.
    """

    method: str = "folder"
    layers: tuple[int, ...] | None = None
    ratio: float | None = None
    tokens: int | None = None
    alpha: float = 0.0
    proportional_attention: bool = False
    restore_order: bool = False
    encoder: str = ""

    def __post_init__(self) -> None:
        valid_choice("token method", self.method, METHODS)
        if isinstance(self.layers, int) and not isinstance(self.layers, bool):
            object.__setattr__(self, "layers", (self.layers,))
        elif self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or not self.layers or \
                    not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
                raise OptionError(f"token option 'layers' must be an int or a non-empty list of ints, "
                                  f"got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(self.layers))
        if (self.ratio is None) == (self.tokens is None):
            raise OptionError("token reduction needs exactly one of 'ratio' (fraction of patch tokens removed) "
                              "or 'tokens' (tokens kept)")
        if self.ratio is not None and not 0 <= finite_number("token option 'ratio'", self.ratio) < 1:
            raise OptionError(f"token option 'ratio' must be a number in [0, 1), got {self.ratio!r}")
        if self.tokens is not None and (isinstance(self.tokens, bool) or not isinstance(self.tokens, int)
                                        or self.tokens < 1):
            raise OptionError(f"token option 'tokens' must be a positive int, got {self.tokens!r}")
        if finite_number("token option 'alpha'", self.alpha) < 0:
            raise OptionError(f"token option 'alpha' must be a number >= 0, got {self.alpha!r}")
        if self.alpha and self.method not in ("folder", "tome"):
            raise OptionError(f"token option 'alpha' applies to methods folder and tome, not {self.method!r}")
        for name in ("proportional_attention", "restore_order"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"token option {name!r} must be bool, got {getattr(self, name)!r}")
        if not isinstance(self.encoder, str):
            raise OptionError(f"token option 'encoder' must be a module path string, got {self.encoder!r}")

    @classmethod
    def from_options(cls, options: "TokenConfig | dict") -> "TokenConfig":
        if isinstance(options, TokenConfig):
            return options
        if not isinstance(options, dict):
            raise OptionError(f"token options must be a TokenConfig or a dict, got {type(options).__name__}")
        return cls(**known_fields("token", options, cls))

    @property
    def is_identity(self) -> bool:
        return self.ratio == 0

    def layer_indices(self, num_layers: int) -> list[int]:
        """The reducing layers as sorted non-negative indices."""
        requested = self.layers if self.layers is not None else \
            tuple(range(num_layers)) if self.method == "tome" else (-1,)
        bad = [i for i in requested if not -num_layers <= i < num_layers]
        if bad:
            raise OptionError(f"token option 'layers' has {bad} but the encoder has {num_layers} layers "
                              f"(valid: {-num_layers}..{num_layers - 1})")
        return sorted({i % num_layers for i in requested})

    def target(self, count: int, protected: int) -> int:
        """Tokens left after the last reducing layer, from `count` input tokens."""
        if self.tokens is not None:
            if self.tokens <= protected:
                raise OptionError(f"token option 'tokens' must exceed the {protected} protected prefix token(s), "
                                  f"got {self.tokens}")
            return min(self.tokens, count)
        return max(protected + 1, count - round(self.ratio * (count - protected)))

    def schedule(self, count: int, num_layers: int, protected: int) -> dict[int, int]:
        """Layer index -> tokens left after that layer (only layers that reduce)."""
        layers = self.layer_indices(num_layers)
        removed = count - self.target(count, protected)
        plan, current = {}, count
        for rank, layer in enumerate(layers):
            share = removed // len(layers) + (rank < removed % len(layers))
            if share == 0:
                continue
            after = pool_count(current, current - share, protected) if self.method == "pool" else current - share
            if after < current:
                plan[layer] = current = after
        return plan

