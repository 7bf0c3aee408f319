"""Keys under which fxcompress stores its annotations in `node.meta`."""

STABLE_NAME = "fxcompress_name"  # "<module path>:<op>[#k]", equal across capture methods
SHAPE = "fxcompress_shape"  # torch.Size of the node's tensor output on the example inputs
