"""The pass registry. Every pass is `pass(gm, ctx) -> changed`; file = function = registry key."""
from ..errors import valid_choice
from .absorb_residual import absorb_residual
from .cleanup import cleanup
from .fold_batchnorm import fold_batchnorm
from .linearize import linearize
from .merge_conv_chain import merge_conv_chain
from .merge_linear_chain import merge_linear_chain

PASSES = {fn.__name__: fn for fn in (linearize, cleanup, fold_batchnorm, merge_linear_chain,
                                     merge_conv_chain, absorb_residual)}

# Plan actions and the pass that applies each; they run first, in this order, and change outputs by design.
PLAN_PASSES = {"linearize": "linearize"}

# Exact passes, repeated in this order until none changes the graph: absorbing a shortcut can turn a
# fan-out into a chain that merges further.
EXACT_PIPELINE = ("cleanup", "fold_batchnorm", "merge_linear_chain", "merge_conv_chain", "absorb_residual")


def get_pass(name: str):
    valid_choice("pass", name, PASSES)
    return PASSES[name]
