"""The pass registry (file = function = name; the contract is in README.md beside this file).

Analyses annotate `node.meta` and return None. Rewrite passes (the exact passes and the plan actions' passes)
yield `context.Site`s, which the pipeline applies, verifies and, for exact passes, rolls back one by one.
"""
from .absorb_residual import absorb_residual
from .annotate_block_distance import annotate_block_distance
from .annotate_bn_state import annotate_bn_state
from .annotate_entropy import annotate_entropy
from .cleanup import cleanup
from .fold_batchnorm import fold_batchnorm
from .fold_constants import fold_constants
from .linearize import LINEARIZE
from .merge_conv_chain import merge_conv_chain
from .merge_linear_chain import merge_linear_chain
from .merge_tokens import MERGE_TOKENS
from .remove_block import REMOVE_BLOCK
from .remove_channels import REMOVE_CHANNELS
from .zero_channels import ZERO_CHANNELS

ANALYSES = {fn.__name__: fn for fn in (annotate_entropy, annotate_bn_state, annotate_block_distance)}

# Plan actions, each defined beside its pass (`plan.PlanAction`); their passes run first, in this order, and
# change outputs by design. Blocks go before channels (a removed block's channels need no removal), zeroing
# before removing (both index channels as in the original graph; zeroing keeps shapes), channels before
# linearize (an off channel is removed or zeroed while its activation still zeroes it).
PLAN_ACTIONS = {action.name: action for action in (REMOVE_BLOCK, ZERO_CHANNELS, REMOVE_CHANNELS, LINEARIZE,
                                                   MERGE_TOKENS)}

# Exact passes, repeated in this order until none changes the graph: absorbing a shortcut can turn a
# fan-out into a chain that merges further. Weights computed from constants (prune masks, weight_norm) are
# folded first so that the merges can read them.
EXACT_PASSES = (fold_constants, cleanup, fold_batchnorm, merge_linear_chain, merge_conv_chain, absorb_residual)
