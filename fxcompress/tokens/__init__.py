"""Token reduction for vision transformers (FOLDER, ToMe schedule, pooling and random-drop baselines)."""
from .config import METHODS, TokenConfig
from .families import SUPPORTED, find_encoder
from .reduce import reduce_tokens

__all__ = ["TokenConfig", "reduce_tokens", "find_encoder", "METHODS", "SUPPORTED"]
