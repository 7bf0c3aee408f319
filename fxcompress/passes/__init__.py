"""The pass registry. Every pass is `pass(gm, ctx) -> changed`; file = function = registry key."""
from ..errors import valid_choice
from .absorb_residual import absorb_residual
from .annotate_block_distance import annotate_block_distance
from .annotate_bn_state import annotate_bn_state
from .annotate_entropy import annotate_entropy
from .cleanup import cleanup
from .fold_batchnorm import fold_batchnorm
from .fold_constants import fold_constants
from .linearize import linearize
from .merge_conv_chain import merge_conv_chain
from .merge_linear_chain import merge_linear_chain
from .merge_tokens import merge_tokens
from .remove_block import remove_block
from .remove_channels import remove_channels
from .zero_channels import zero_channels

PASSES = {fn.__name__: fn for fn in (linearize, cleanup, fold_constants, fold_batchnorm, merge_linear_chain,
                                     merge_conv_chain, absorb_residual, remove_block, remove_channels, zero_channels,
                                     annotate_entropy, annotate_bn_state, annotate_block_distance, merge_tokens)}

# Plan actions and the pass that applies each; they run first, in this order, and change outputs by design.
# Blocks go before channels (a removed block's channels need no removal), channels before linearize (an
# off channel is removed or zeroed while its activation still zeroes it).
PLAN_PASSES = {"remove_block": "remove_block", "remove_channels": "remove_channels",
               "zero_channels": "zero_channels", "linearize": "linearize",
               "merge_tokens": "merge_tokens"}

# Exact passes, repeated in this order until none changes the graph: absorbing a shortcut can turn a
# fan-out into a chain that merges further. Weights computed from constants (prune masks, weight_norm) are
# folded first so that the merges can read them.
EXACT_PIPELINE = ("fold_constants", "cleanup", "fold_batchnorm", "merge_linear_chain", "merge_conv_chain",
                  "absorb_residual")


def get_pass(name: str):
    valid_choice("pass", name, PASSES)
    return PASSES[name]
