"""The units a one-shot selection chooses from, found on a captured graph.

- "linearize": a run of 1 to `MAX_RUN` activations that follow each other through linear ops (each reaches
  the next through single-user ops: `next_activation`), linearised together. A run is its own unit because
  its merge is: the two activations of an inverted residual, linearised together, collapse the block into
  one dense conv with its shortcut as a Dirac tap, while either alone unlocks only a merge that costs more.
  A transformer MLP's activation is a run of one (fc1 and fc2 then merge).
- "remove_block": a residual block with an identity shortcut replaced by its input (LaCoOT's unit; a
  transformer layer's attention and MLP together: `blocks.monitored_blocks`).
- "remove_channels": the channels an activation's BatchNorm judges off (TLC: beta < 0) removed, the activation
  kept (`planner.off_decision`); the likeliest off first, as many as leave a multiple of `CHANNEL_ALIGN`
  channels (kernels run whole vector blocks: ONNX Runtime was measured slower with 85 channels than with 144).

Two candidates conflict (`conflicts`) when they touch one activation or block, or hold neighbouring activations
of one run: taking both would unlock a merge that neither has alone, and that merge is the longer run's own
candidate. Compatible candidates are then taken to add up (latency saved, importance lost); the selection's
result is measured whole to check it (`selection.select`).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from torch import fx

from .. import meta
from ..blocks import monitored_blocks, residual_block
from ..criteria import OFF
from ..graph import real_users, stable_name
from ..ops import activation_regions, bind
from ..plan import Decision
from ..planner import off_decision

MAX_RUN = 3
CHANNEL_ALIGN = 8
KINDS = ("linearize", "remove_block", "remove_channels")


@dataclass(frozen=True)
class Candidate:
    name: str
    kind: str  # one of KINDS
    decisions: tuple[Decision, ...]
    activations: frozenset[str]  # the activations it linearises, removes with a block, or prunes channels of
    blocks: frozenset[str] = frozenset()  # the residual adds it removes


def next_activation(node: fx.Node) -> fx.Node | None:
    """The activation that `node`'s output reaches through a chain of single-user ops none of which is an
    activation (convs, BatchNorms, adds, ...), or None."""
    current = node
    while len(users := real_users(current)) == 1:
        current = users[0]
        call = bind(current)
        if call is not None and call.kind == "activation":
            return current
    return None


def activation_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [node for node in gm.graph.nodes if (call := bind(node)) is not None and call.kind == "activation"]


def runs(gm: fx.GraphModule, max_run: int = MAX_RUN) -> list[tuple[fx.Node, ...]]:
    """Every run of 1 to `max_run` activations, each reaching the next through linear single-user ops."""
    found = []
    for node in activation_nodes(gm):
        run = (node,)
        while True:
            found.append(run)
            following = next_activation(run[-1])
            if len(run) == max_run or following is None:
                break
            run += (following,)
    return found


def run_candidate(run: tuple[fx.Node, ...]) -> Candidate:
    names = tuple(map(stable_name, run))
    return Candidate(f"linearize {'+'.join(names)}", "linearize", tuple(Decision("linearize", n) for n in names),
                     frozenset(names))


def _body_activations(add: fx.Node, block_input: fx.Node, body: fx.Node) -> frozenset[str]:
    """The activations computed between the block input and the add on the body's side."""
    found, seen, work = set(), set(), [body]
    while work:
        node = work.pop()
        if node in seen or node is block_input or node.op != "call_function":
            continue
        seen.add(node)
        call = bind(node)
        if call is not None and call.kind == "activation":
            found.add(stable_name(node))
        work += node.all_input_nodes
    return frozenset(found)


def block_candidates(gm: fx.GraphModule) -> list[Candidate]:
    """One candidate per monitored block (`blocks.monitored_blocks`): all its adds removed."""
    nodes = {stable_name(node): node for node in gm.graph.nodes}
    found = []
    for block, adds in monitored_blocks(gm).items():
        activations = frozenset()
        for add in adds:
            block_input, _, body = residual_block(nodes[add])
            activations |= _body_activations(nodes[add], block_input, body)
        found.append(Candidate(f"remove_block {block}", "remove_block",
                               tuple(Decision("remove_block", add) for add in adds), activations, frozenset(adds)))
    return found


def channel_candidates(gm: fx.GraphModule) -> list[Candidate]:
    """The off channels of each activation annotated by `annotate_bn_state`, removed (or zeroed) where some
    but not all are off and their activation outputs an exact zero there."""
    found = []
    for node in activation_nodes(gm):
        states = node.meta.get(meta.CHANNEL_STATES)
        if states is None or activation_regions(bind(node)).below != "zero":
            continue
        labels = states.states()
        off = sorted((channel for channel, label in enumerate(labels) if label == OFF),
                     key=lambda channel: -float(states.p_off[channel]))
        kept_back = -(len(labels) - len(off)) % CHANNEL_ALIGN  # channels not removed, to round the rest up
        off = sorted(off[:max(0, len(off) - kept_back)])
        if not off or len(off) == len(labels):
            continue
        decision = off_decision(gm, node, off, max_error=1.0)
        if isinstance(decision, Decision) and decision.action == "remove_channels":
            name = stable_name(node)
            found.append(Candidate(f"remove_channels {name} ({len(off)} of {len(labels)})",
                                   "remove_channels", (decision,), frozenset({name})))
    return found


def find_candidates(gm: fx.GraphModule, kinds: tuple[str, ...] = KINDS, max_run: int = MAX_RUN) -> list[Candidate]:
    """The candidates of `kinds` on `gm` (names and shapes annotated; BatchNorm states for remove_channels)."""
    found = []
    if "linearize" in kinds:
        found += [run_candidate(run) for run in runs(gm, max_run)]
    if "remove_block" in kinds:
        found += block_candidates(gm)
    if "remove_channels" in kinds:
        found += channel_candidates(gm)
    return found


def neighbours(gm: fx.GraphModule) -> set[frozenset[str]]:
    """Pairs of activations of which one reaches the other through linear single-user ops."""
    return {frozenset((stable_name(node), stable_name(following))) for node in activation_nodes(gm)
            if (following := next_activation(node)) is not None}


def conflicts(candidates: list[Candidate], adjacent: set[frozenset[str]]) -> set[frozenset[int]]:
    """Index pairs of candidates that exclude each other (module docstring)."""
    pairs = set()
    for (i, a), (j, b) in itertools.combinations(enumerate(candidates), 2):
        if a.activations & b.activations or a.blocks & b.blocks or \
                any(frozenset((x, y)) in adjacent for x in a.activations for y in b.activations):
            pairs.add(frozenset((i, j)))
    return pairs
