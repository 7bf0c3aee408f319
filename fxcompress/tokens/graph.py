"""Token reduction on a captured graph (the `depthprune` backend's path): find encoder layers, make a plan.

Inside a dynamo or export graph attention is one opaque op and the model cannot be substituted, so
`merge_tokens` inserts a reduction on the output of a scheduled encoder layer, matching on features.
A graph specialised to the token count downstream of that point (a reshape with the count baked in, as
timm and transformers attention produce) cannot take fewer tokens: `token_plan` refuses it, naming the
node, rather than guess. torchvision's ViT keeps `multi_head_attention_forward` opaque and accepts a
reduction after any layer; other families accept it after the last layer, and `reduce_tokens` serves them
everywhere.
"""
from __future__ import annotations

from torch import fx
from torch.utils import _pytree as pytree

from ..errors import OptionError
from ..graph import normalize_path, stable_name, tensor_shape
from ..plan import Decision, Plan
from .config import TokenConfig
from .families import FAMILIES, choose_encoder


def _type_name(kind) -> str:
    return kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"


_BLOCKS = {f"{family.module}.{family.block}": family for family in FAMILIES}


def encoder_layer_outputs(gm: fx.GraphModule, path: str = "") -> list[fx.Node]:
    """The output node (last node in graph order) of each layer of the graph's vision encoder."""
    found: dict[str, dict[str, fx.Node]] = {}
    for node in gm.graph.nodes:
        for module_path, kind in (node.meta.get("nn_module_stack") or {}).values():
            if _type_name(kind) in _BLOCKS:
                layer = normalize_path(module_path)
                found.setdefault(layer.rpartition(".")[0], {})[layer] = node
    if not found:
        return []
    return list(found[choose_encoder(list(found), path, type(gm).__name__)].values())


def _baked_count(node: fx.Node, count: int, batch: int) -> bool:
    literals = [v for v in pytree.tree_leaves((node.args, node.kwargs)) if type(v) is int]
    return any(v in (count, count * batch) for v in literals)


def token_plan(gm: fx.GraphModule, config: TokenConfig) -> Plan:
    """`merge_tokens` decisions for `config` on a graph annotated with names and shapes."""
    if config.alpha or config.proportional_attention:
        raise OptionError("token options 'alpha' and 'proportional_attention' need the attention's keys, which a "
                          "captured graph does not expose; use torch.compile(fxcompress.reduce_tokens(model, ...), "
                          "backend='depthprune')")
    outputs = encoder_layer_outputs(gm, config.encoder)
    if not outputs:
        raise OptionError("no supported ViT encoder layer found in the graph (torchvision, timm, transformers "
                          "CLIP/ViT encoder blocks)")
    shape = tensor_shape(outputs[0])
    if shape is None or len(shape) != 3:
        raise OptionError(f"encoder layer output {stable_name(outputs[0])} is not a [batch, tokens, channels] "
                          "tensor")
    batch, count = shape[0], shape[1]
    protected = 1
    schedule = config.schedule(count, len(outputs), protected)
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    decisions, current = [], count
    for layer, target in schedule.items():
        site = outputs[layer]
        baked = next((n for n in gm.graph.nodes if order[n] > order[site] and _baked_count(n, current, batch)), None)
        if baked is not None:
            raise OptionError(f"cannot reduce tokens after encoder layer {layer} in this graph: {stable_name(baked)} "
                              f"has the token count {current} baked in; reduce at the last layer, or use "
                              "torch.compile(fxcompress.reduce_tokens(model, ...), backend='depthprune')")
        decisions.append(Decision("merge_tokens", stable_name(site),
                                  {"method": config.method, "tokens": target, "protected": protected,
                                   "restore_order": config.restore_order}))
        current = target
    return Plan(tuple(decisions))


def layer_output_names(gm: fx.GraphModule) -> list[str]:
    return [stable_name(node) for node in encoder_layer_outputs(gm)]

