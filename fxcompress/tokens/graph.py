"""Token reduction on a captured graph (the `depthprune` backend's path): find encoder layers, make a plan.

Inside a dynamo or export graph the model cannot be substituted, so `merge_tokens` inserts the reduction
(`token_merge.reduce_step`, the same `reduce` as `reduce_tokens`) on the output of a scheduled encoder layer.
It reads what the module path reads, from the graph itself:
- the prefix tokens (CLS, registers) it protects: the tokens that the one concatenation on the token axis
  before the first layer puts in front of the patch tokens (its one input computed by a conv or linear, the
  patch embedding); where there is no such concatenation, `token_plan` refuses rather than guess;
- the metric FOLDER/ToMe match on: the keys of the layer's attention, the `key` of its
  `scaled_dot_product_attention` (export graphs, timm and transformers in dynamo graphs) or the keys that
  `token_merge.projected_keys` computes from the inputs of an opaque `multi_head_attention_forward`
  (torchvision's ViT in a dynamo graph); a layer without one of these (e.g. timm with `fused_attn` off) is
  refused for folder/tome, naming the layer.
A graph specialised to the token count downstream of that point (a reshape with the count baked in, as
timm and transformers attention, and torchvision's attention in an export graph, produce) cannot take fewer
tokens: `token_plan` refuses it, naming the node. The CLS attention (alpha) and proportional attention would
need the attention itself changed: `reduce_tokens` serves them, and every layer of every family.
"""
from __future__ import annotations

from torch import fx
from torch.utils import _pytree as pytree

from ..errors import OptionError
from ..graph import normalize_path, stable_name, tensor_shape
from ..ops import OpCall, bind, bind_attention
from ..plan import Decision, Plan
from ..token_merge import MATCHING, projected_keys
from .config import TokenConfig
from .families import FAMILIES, choose_encoder

_FULL_PATH = "use torch.compile(fxcompress.reduce_tokens(model, ...), backend='depthprune')"


def _type_name(kind) -> str:
    return kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"


_BLOCKS = {f"{family.module}.{family.block}": family for family in FAMILIES}


def _layer_path(node: fx.Node) -> str | None:
    """The module path of the encoder block that `node` runs in, None outside any."""
    for module_path, kind in (node.meta.get("nn_module_stack") or {}).values():
        if _type_name(kind) in _BLOCKS:
            return normalize_path(module_path)
    return None


def encoder_layers(gm: fx.GraphModule, path: str = "") -> list[list[fx.Node]]:
    """The nodes of each layer of the graph's vision encoder, in graph order."""
    found: dict[str, dict[str, list[fx.Node]]] = {}
    for node in gm.graph.nodes:
        layer = _layer_path(node)
        if layer is not None:
            found.setdefault(layer.rpartition(".")[0], {}).setdefault(layer, []).append(node)
    if not found:
        return []
    return list(found[choose_encoder(list(found), path, type(gm).__name__)].values())


def encoder_layer_outputs(gm: fx.GraphModule, path: str = "") -> list[fx.Node]:
    """The output node (last node in graph order) of each layer of the graph's vision encoder."""
    return [nodes[-1] for nodes in encoder_layers(gm, path)]


def layer_output_names(gm: fx.GraphModule) -> list[str]:
    return [stable_name(node) for node in encoder_layer_outputs(gm)]


def _plain_mha(call: OpCall) -> bool:
    return not call["use_separate_proj_weight"] and not call["add_zero_attn"] and \
        call["bias_k"] is None and call["static_k"] is None and call["in_proj_weight"] is not None


def layer_attention(nodes: list[fx.Node]) -> OpCall | None:
    """The one attention op among a layer's nodes whose keys can be read, or None."""
    calls = [call for node in nodes if (call := bind_attention(node)) is not None]
    if len(calls) != 1 or (calls[0].name == "multi_head_attention_forward" and not _plain_mha(calls[0])):
        return None
    return calls[0]


def attention_of(node: fx.Node) -> OpCall | None:
    """The attention of the encoder layer that `node` belongs to (its output), or None."""
    layer = _layer_path(node)
    if layer is None:
        return None
    return layer_attention([n for n in node.graph.nodes if _layer_path(n) == layer])


def emit_keys(gm: fx.GraphModule, attention: OpCall) -> fx.Node:
    """A node holding the attention's keys `[B, H, N, d]`: its `key` input, or computed after it."""
    if attention.name == "scaled_dot_product_attention":
        return attention["key"]
    with gm.graph.inserting_after(attention.node):
        return gm.graph.call_function(projected_keys, (attention["key"], attention["in_proj_weight"],
                                                       attention["in_proj_bias"], attention["num_heads"]))


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, work = set(), list(node.all_input_nodes)
    while work:
        current = work.pop()
        if current not in seen:
            seen.add(current)
            work.extend(current.all_input_nodes)
    return seen


def _from_weight_op(node: fx.Node) -> bool:
    return any((call := bind(n)) is not None and call.kind in ("conv", "linear") for n in _ancestors(node) | {node})


def _token_concat(node: fx.Node) -> OpCall | None:
    call = bind(node)
    shape = tensor_shape(node)
    if call is None or call.kind != "concat" or shape is None or len(shape) != 3:
        return None
    return call if call["dim"] % 3 == 1 else None


def prefix_tokens(first_layer: list[fx.Node]) -> int:
    """How many prefix tokens (CLS, registers) stand in front of the patch tokens at the encoder's input."""
    inside = set(first_layer)
    concats = [call for node in _ancestors(first_layer[-1]) - inside if (call := _token_concat(node)) is not None]
    if len(concats) != 1:
        found = "no concatenation" if not concats else f"{len(concats)} concatenations"
        raise OptionError(f"cannot tell how many prefix tokens (CLS, registers) to protect in this graph: {found} "
                          f"of tokens before the first encoder layer; {_FULL_PATH}")
    concat = concats[0]
    parts = list(concat["tensors"])
    patches = [index for index, part in enumerate(parts) if _from_weight_op(part)]
    if patches != [len(parts) - 1] or tensor_shape(concat.node)[1] != tensor_shape(first_layer[-1])[1]:
        raise OptionError(f"cannot tell how many prefix tokens (CLS, registers) to protect in this graph: "
                          f"{stable_name(concat.node)} does not put them in front of the patch tokens that the "
                          f"encoder reads; {_FULL_PATH}")
    return sum(tensor_shape(part)[1] for part in parts[:-1])


def _baked_count(node: fx.Node, count: int, batch: int) -> bool:
    literals = [v for v in pytree.tree_leaves((node.args, node.kwargs)) if type(v) is int]
    return any(v in (count, count * batch) for v in literals)


def token_plan(gm: fx.GraphModule, config: TokenConfig) -> Plan:
    """`merge_tokens` decisions for `config` on a graph annotated with names and shapes."""
    if config.alpha or config.proportional_attention:
        raise OptionError("token options 'alpha' and 'proportional_attention' change the attention itself, which "
                          f"a captured graph keeps as one op; {_FULL_PATH}")
    layers = encoder_layers(gm, config.encoder)
    if not layers:
        raise OptionError("no supported ViT encoder layer found in the graph (torchvision, timm, transformers "
                          "CLIP/ViT encoder blocks)")
    shape = tensor_shape(layers[0][-1])
    if shape is None or len(shape) != 3:
        raise OptionError(f"encoder layer output {stable_name(layers[0][-1])} is not a [batch, tokens, channels] "
                          "tensor")
    batch, count = shape[0], shape[1]
    protected = prefix_tokens(layers[0])
    schedule = config.schedule(count, len(layers), protected)
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    decisions, current = [], count
    for layer, target in schedule.items():
        site = layers[layer][-1]
        if config.method in MATCHING and layer_attention(layers[layer]) is None:
            raise OptionError(f"cannot match tokens after encoder layer {layer} ({_layer_path(site)}): {config.method} "
                              "matches on the keys of the layer's attention, and the graph has no "
                              "scaled_dot_product_attention or multi_head_attention_forward there to read them "
                              f"from; methods pool and drop need no keys, or {_FULL_PATH}")
        baked = next((n for n in gm.graph.nodes if order[n] > order[site] and _baked_count(n, current, batch)), None)
        if baked is not None:
            raise OptionError(f"cannot reduce tokens after encoder layer {layer} in this graph: {stable_name(baked)} "
                              f"has the token count {current} baked in; reduce at the last layer, or {_FULL_PATH}")
        decisions.append(Decision("merge_tokens", stable_name(site),
                                  {"method": config.method, "tokens": target, "protected": protected,
                                   "restore_order": config.restore_order}))
        current = target
    return Plan(tuple(decisions))
