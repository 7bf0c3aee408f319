"""Structures that span several nodes: residual blocks and channel groups.

A channel group is the set of tensors whose channel c is one and the same channel: the output of the
conv/linear that produces it, the per-channel ops it passes through (BatchNorm, activations, dropout,
pooling, depthwise convs), both operands of a residual add, and its slice of a concatenation. Removing
channel c from the group means dropping output channel c of every producer, entry c of every per-channel
op, and input channel c of every conv/linear that reads the group (its consumers); this equals zeroing
channel c at each consumer's input. In a token layout (N, T, C) made by a linear (a transformer's MLP) the
channels are the last axis: there the group may pass only through linears, activations, dropout and adds.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

from torch import fx

from .graph import channel_axis, channel_width, constant, module_path, real_users, stable_name, tensor_shape
from .errors import NoMatch
from .ops import OpCall, bind
from .plan import Decision, check_channels

_PER_CHANNEL = ("batch_norm", "activation", "dropout", "pool")
_TOKEN_LAYOUT_OPS = ("linear", "activation", "dropout", "add")  # the ops a token-layout group may pass through
SHORTCUT_MODULES = ("downsample", "shortcut", "skip")  # names models give a projection shortcut


def _computed_ancestors(node: fx.Node) -> set[fx.Node]:
    seen, work = set(), [node]
    while work:
        current = work.pop()
        if current in seen or current.op not in ("call_function", "call_method", "placeholder"):
            continue
        seen.add(current)
        work += current.all_input_nodes
    return seen


def _in_shortcut_module(node: fx.Node) -> bool:
    return any(part in SHORTCUT_MODULES for part in module_path(node).split("."))


def residual_block(add: fx.Node):
    """(block input, shortcut operand, body operand) of a residual add y = body(x) + shortcut(x), or NoMatch.
    The block input is the latest node both operands depend on. The shortcut is the block input itself (an
    identity shortcut) or the operand computed only in modules named as in SHORTCUT_MODULES (a projection,
    torchvision's `downsample`); otherwise the two cannot be told apart safely and the add is refused."""
    call = bind(add)
    if call is None or call.kind != "add":
        return NoMatch("not an add")
    operands = [call["input"], call["other"]]
    if not all(isinstance(op, fx.Node) and tensor_shape(op) == tensor_shape(add) for op in operands):
        return NoMatch("not an add of two tensors of the output's shape")
    ancestors = [_computed_ancestors(op) for op in operands]
    common = ancestors[0] & ancestors[1]
    if not common:
        return NoMatch("the operands share no input")
    order = {node: index for index, node in enumerate(add.graph.nodes)}
    block_input = max(common, key=order.__getitem__)
    before = _computed_ancestors(block_input)
    identity = [op is block_input for op in operands]
    projection = [bool(a - before) and all(_in_shortcut_module(n) for n in a - before) for a in ancestors]
    for marks in (identity, projection):
        if marks.count(True) == 1:
            shortcut = marks.index(True)
            return block_input, operands[shortcut], operands[1 - shortcut]
    return NoMatch("no operand is the block input itself or computed only in a module named "
                   f"{'/'.join(SHORTCUT_MODULES)}: the shortcut cannot be told from the body")


def validate_channels(decision: Decision, node: fx.Node) -> None:
    """The params of a decision on the channels of `node` (remove_channels, zero_channels): `check_channels`
    against the width of its channel axis."""
    check_channels(decision, channel_width(node))


def is_depthwise(gm: fx.GraphModule, call: OpCall) -> bool:
    weight = constant(gm, call["weight"])
    return call.kind == "conv" and weight is not None and weight.shape[1] == 1 and \
        int(call["groups"]) == weight.shape[0] > 1


@dataclass
class ChannelGroup:
    members: dict[fx.Node, set[int]] = field(default_factory=dict)  # tensor -> its channels to remove
    producers: dict[fx.Node, set[int]] = field(default_factory=dict)  # conv/linear/BN/depthwise: output rows
    consumers: dict[fx.Node, set[int]] = field(default_factory=dict)  # conv/linear: input channels

    def merge(self, other: "ChannelGroup") -> None:
        for mine, theirs in ((self.members, other.members), (self.producers, other.producers),
                             (self.consumers, other.consumers)):
            for node, channels in theirs.items():
                mine.setdefault(node, set()).update(channels)


def _channels(node: fx.Node) -> int:
    return channel_width(node)


def _token_layout(node: fx.Node) -> bool:
    """Whether `node`'s channels are its last axis of three or more (`graph.channel_axis`)."""
    rank = len(tensor_shape(node))
    return rank >= 3 and channel_axis(node) == rank - 1


def _token_refusal(node: fx.Node, call: OpCall, name: str) -> NoMatch | None:
    if _token_layout(node) and call.kind not in _TOKEN_LAYOUT_OPS:
        return NoMatch(f"channel group reaches {name} ({call.name}) in a token layout")
    return None


def _cat_offsets(call: OpCall) -> list[int] | NoMatch:
    tensors = call["tensors"]
    ranks = {len(tensor_shape(t) or ()) for t in tensors}
    if len(ranks) != 1 or call["dim"] not in (1, 1 - ranks.pop()):
        return NoMatch("concatenation along a dimension other than channels")
    offsets, total = [], 0
    for tensor in tensors:
        offsets.append(total)
        total += _channels(tensor)
    return offsets


def _backward(gm: fx.GraphModule, group: ChannelGroup, node: fx.Node, channels: set[int]):
    """Neighbours that produce `node`'s channels, or NoMatch."""
    name = stable_name(node)
    if node.op == "call_function" and node.target is operator.getitem:
        source = bind(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if source is None or source.kind != "batch_norm" or node.args[1] != 0:
            return NoMatch(f"channel group reaches {name}, an op whose channels cannot be traced")
        group.producers.setdefault(source.node, set()).update(channels)
        return [(source["input"], channels)]
    call = bind(node)
    if node.op == "placeholder":
        return NoMatch(f"channel group reaches the graph input {name}")
    if call is None:
        return NoMatch(f"channel group reaches {name}, an op whose channels cannot be traced")
    if (refusal := _token_refusal(node, call, name)) is not None:
        return refusal
    if call.kind == "conv" and call.args.get("transposed"):
        return NoMatch(f"channel group reaches transposed conv {name}")
    if call.kind in ("conv", "linear") and not is_depthwise(gm, call):
        if call.kind == "linear" and len(tensor_shape(node)) != 2 and not _token_layout(node):
            return NoMatch(f"{name} outputs channels off its last axis")
        if call.kind == "conv" and int(call["groups"]) != 1:
            return NoMatch(f"{name} is a grouped conv")
        group.producers.setdefault(node, set()).update(channels)
        return []
    if call.kind in _PER_CHANNEL or call.kind == "conv":
        if call.kind in ("batch_norm", "conv"):
            group.producers.setdefault(node, set()).update(channels)
        return [(call["input"], channels)]
    if call.kind == "add":
        operands = [op for op in (call["input"], call["other"]) if isinstance(op, fx.Node)]
        if any(tensor_shape(op) != tensor_shape(node) for op in operands):
            return NoMatch(f"residual add {name} broadcasts an operand")
        return [(op, channels) for op in operands]
    if call.kind == "concat":
        offsets = _cat_offsets(call)
        if not offsets:
            return offsets
        result = []
        for tensor, offset in zip(call["tensors"], offsets):
            mine = {c - offset for c in channels if offset <= c < offset + _channels(tensor)}
            if mine:
                result.append((tensor, mine))
        return result
    return NoMatch(f"channel group reaches {name} ({call.name}), which does not keep channels apart")


def _forward(gm: fx.GraphModule, group: ChannelGroup, node: fx.Node, user: fx.Node, channels: set[int]):
    """What `user` does with `node`'s channels: a consumer (recorded) or neighbours, or NoMatch."""
    if user.op == "output":
        return NoMatch(f"channel group of {stable_name(node)} reaches the graph output")
    call = bind(user)
    name = stable_name(user)
    if call is None:
        return NoMatch(f"channel group reaches {name}, an op whose channels cannot be traced")
    if (refusal := _token_refusal(node, call, name)) is not None:
        return refusal
    if call.kind in ("conv", "linear", "batch_norm") and call["input"] is not node:
        return NoMatch(f"{stable_name(node)} is used as a parameter of {name}")
    if call.kind in ("conv", "linear") and not is_depthwise(gm, call):
        if call.kind == "conv" and int(call["groups"]) != 1:
            return NoMatch(f"{name} is a grouped conv")
        if call.kind == "linear" and len(tensor_shape(node)) != 2 and not _token_layout(node):
            return NoMatch(f"{name} reads channels off their last axis; channel removal handles (N, C, ...), "
                           "(N, F) and token layouts (N, T, C)")
        group.consumers.setdefault(user, set()).update(channels)
        return []
    if call.kind in _PER_CHANNEL or call.kind in ("conv", "add"):
        return [(call.output if call.tuple_output else user, channels)]
    if call.kind == "concat":
        offsets = _cat_offsets(call)
        if not offsets:
            return offsets
        return [(user, {c + offset for c in channels}) for tensor, offset in zip(call["tensors"], offsets)
                if tensor is node]
    return NoMatch(f"channel group reaches {name} ({call.name}), which does not keep channels apart")


def channel_group(gm: fx.GraphModule, seed: fx.Node, channels) -> ChannelGroup | NoMatch:
    """The channel group of `seed` restricted to `channels`, or why it cannot be removed."""
    group = ChannelGroup()
    work = [(seed, set(channels))]
    while work:
        node, channels = work.pop()
        new = channels - group.members.get(node, set())
        if not new:
            continue
        group.members.setdefault(node, set()).update(new)
        if tensor_shape(node) is None or len(tensor_shape(node)) < 2:
            return NoMatch(f"{stable_name(node)} has no channel dimension")
        steps = _backward(gm, group, node, new)
        if not isinstance(steps, list):
            return steps
        for user in real_users(node):
            more = _forward(gm, group, node, user, new)
            if not isinstance(more, list):
                return more
            steps += more
        work += steps
    if len({_token_layout(node) for node in group.members}) > 1:
        return NoMatch(f"channel group of {stable_name(seed)} mixes a token layout with channels on axis 1")
    for node, removed in group.members.items():
        if len(removed) >= _channels(node):
            return NoMatch(f"removing {len(removed)} channels would empty {stable_name(node)}")
    return group


def monitored_blocks(gm: fx.GraphModule) -> dict[str, tuple[str, ...]]:
    """The blocks of `gm` (a captured graph with names and shapes: the planned graph of a model, where removed
    blocks are gone), in graph order: block name -> the stable names of its residual adds. The adds are those
    `remove_block` can target whose shortcut is the block input itself; consecutive adds of one module form one
    block where each reads the previous one's result as its shortcut (a transformer layer's attention and MLP).
    A block is named by its module, or by its adds where its module holds several blocks. Adds with a
    projection shortcut (torchvision's `downsample`) change the shape of their input and are not monitored."""
    chains: list[list[fx.Node]] = []
    for node in gm.graph.nodes:
        block = residual_block(node)
        if not block or block[1] is not block[0]:
            continue
        if chains and block[0] is chains[-1][-1] and module_path(node) == module_path(block[0]):
            chains[-1].append(node)
        else:
            chains.append([node])
    modules = [module_path(chain[0]) for chain in chains]
    return {module if module and modules.count(module) == 1 else "+".join(map(stable_name, chain)):
            tuple(map(stable_name, chain)) for module, chain in zip(modules, chains)}
