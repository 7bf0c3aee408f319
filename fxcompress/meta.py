"""Keys under which fxcompress stores its annotations in `node.meta`."""

STABLE_NAME = "fxcompress_name"  # "<module path>:<op>[#k]", equal across capture methods
SHAPE = "fxcompress_shape"  # torch.Size of the node's tensor output on the example inputs
ACTIVATION_STATS = "fxcompress_activation_stats"  # criteria.ActivationStats of an activation's input
CHANNEL_STATES = "fxcompress_channel_states"  # criteria.ChannelStates of an activation (TLC criterion)
BLOCK_DISTANCE = "fxcompress_block_distance"  # float: LaCoOT distance between a residual block's input and output
PLAN = "_fxcompress_plan"  # in a planned model's __dict__ (`trainable.apply_plan`): the plan it applies
