"""Unstructured pruning on the loop: weight masks, EGP's entropy-guided budget, global magnitude pruning.

The layers pruned are the convs and linears that feed an activation (through BatchNorms and residual adds) in
the current model's graph (`feeding_layers`), or all of them, the output layer included.
Masks are `torch.nn.utils.prune` masks on those modules, so pruned weights stay zero through fine-tuning
(`set_masks`); a checkpoint holds the plain weights (`plain_state_dict`) and the masks (`masks_of`); `rewind`
sets the weights back to earlier values under the masks (lottery-ticket retraining).

Each round prunes a fraction `rate` of the weights still unpruned in the layers:
- globally by magnitude (`global_magnitude_masks`: the baseline, and DSD²'s pruning);
- by EGP's split (`egp_amounts`): layer l scores S_l = H_l * mean|w != 0|, H_l the entropy of the activation it
  feeds over the channels not constant within a batch; its share of the round's budget is softmax(sum(S) / S_l)
  over the layers, capped at its unpruned weights, the excess redistributed over the others by the same
  softmax; magnitude pruning inside each layer (`layer_magnitude_masks`). Layers whose activation has zero
  entropy are not pruned (the published code).
"""
from __future__ import annotations

import math

import torch
from torch import fx, nn
from torch.nn.utils import prune

from ..errors import OptionError
from ..graph import module_path
from ..ops import bind

_THROUGH = ("batch_norm", "add")  # ops between a layer and the activation it feeds


def feeding_layers(activation: fx.Node) -> list[fx.Node]:
    """The conv and linear nodes whose outputs reach `activation`'s input through BatchNorms and adds only."""
    found, pending, seen = [], [bind(activation)["input"]], set()
    while pending:
        node = pending.pop()
        call = bind(node) if isinstance(node, fx.Node) and node not in seen else None
        if call is None:
            continue
        seen.add(node)
        if call.kind in ("conv", "linear"):
            found.append(node)
        elif call.kind in _THROUGH:
            pending.extend(arg for arg in (call["input"], call.args.get("other")) if isinstance(arg, fx.Node))
    return found


def layer_modules(model: nn.Module, layers: list[fx.Node]) -> list[str]:
    """The module paths of `layers` in `model` whose modules hold a prunable weight (a conv or linear module)."""
    paths = []
    for node in layers:
        path = module_path(node)
        module = _submodule(model, path)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and path not in paths:
            paths.append(path)
    return paths


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight the module computes with: weight_orig * weight_mask where it is pruned."""
    if hasattr(module, "weight_mask"):
        return (module.weight_orig * module.weight_mask).detach()
    return module.weight.detach()


def current_mask(module: nn.Module) -> torch.Tensor:
    if hasattr(module, "weight_mask"):
        return module.weight_mask.detach().bool()
    return torch.ones_like(module.weight, dtype=torch.bool)


def layer_magnitude_masks(model: nn.Module, amounts: dict[str, int]) -> dict[str, torch.Tensor]:
    """For each module path, its mask with the `amount` smallest-magnitude unpruned weights pruned too."""
    masks = {}
    for path, amount in amounts.items():
        module = model.get_submodule(path)
        mask = current_mask(module).clone()
        magnitude = effective_weight(module).abs().flatten()
        alive = mask.flatten().nonzero().squeeze(1)
        amount = min(int(amount), alive.numel())
        if amount:
            smallest = alive[magnitude[alive].topk(amount, largest=False).indices]
            mask.view(-1)[smallest] = False
        masks[path] = mask
    return masks


def global_magnitude_masks(model: nn.Module, paths: list[str], rate: float) -> dict[str, torch.Tensor]:
    """Masks pruning the `rate` fraction of the unpruned weights of `paths` with the smallest magnitudes, over
    all of them together."""
    masks = {path: current_mask(model.get_submodule(path)).clone() for path in paths}
    alive = [mask.flatten().nonzero().squeeze(1) for mask in masks.values()]
    magnitudes = torch.cat([effective_weight(model.get_submodule(path)).abs().flatten()[index]
                            for path, index in zip(paths, alive)])
    pruned = torch.zeros(magnitudes.numel(), dtype=torch.bool, device=magnitudes.device)
    pruned[magnitudes.topk(int(rate * magnitudes.numel()), largest=False).indices] = True
    for mask, index, flags in zip(masks.values(), alive, pruned.split([index.numel() for index in alive])):
        mask.view(-1)[index[flags]] = False
    return masks


def egp_amounts(scores: dict[str, float], unpruned: dict[str, int], rate: float) -> dict[str, float]:
    """EGP's split of the round's budget (`rate` of all unpruned weights) over the layers with `scores` S_l > 0:
    shares softmax(sum(S) / S_l); a layer whose share exceeds its unpruned weights is pruned entirely and leaves
    the split, whose budget and sum(S) lose it; repeated until no share exceeds."""
    if any(not score > 0 for score in scores.values()):
        raise OptionError("EGP scores must be > 0 (layers of zero entropy or no weight are not pruned)")
    budget = rate * sum(unpruned[name] for name in scores)
    total = sum(scores.values())
    waiting, amounts = list(scores), {}
    while waiting:
        heads = {name: total / scores[name] for name in waiting}
        top = max(heads.values())
        weights = {name: math.exp(value - top) for name, value in heads.items()}
        norm = sum(weights.values())
        shares = {name: budget * weight / norm for name, weight in weights.items()}
        capped = [name for name in waiting if shares[name] > unpruned[name]]
        amounts.update(shares)
        if not capped:
            break
        for name in capped:
            amounts[name] = unpruned[name]
            budget -= unpruned[name]
            total -= scores[name]
            waiting.remove(name)
    return amounts


def set_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Prune the modules at the paths of `masks` with them (replacing any earlier mask: a new mask keeps only
    weights the earlier one kept)."""
    for path, mask in masks.items():
        module = model.get_submodule(path)
        if hasattr(module, "weight_mask"):
            prune.remove(module, "weight")
        prune.custom_from_mask(module, "weight", mask.to(module.weight.device))


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {path: module.weight_mask.detach().clone() for path, module in model.named_modules()
            if hasattr(module, "weight_mask")}


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with each pruned weight as the plain `weight` it computes (no _orig/_mask keys)."""
    state = model.state_dict()
    for path in masks_of(model):
        prefix = f"{path}." if path else ""
        state[f"{prefix}weight"] = state.pop(f"{prefix}weight_orig") * state.pop(f"{prefix}weight_mask")
    return state


def rewind(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Set every parameter and buffer of `model` back to its value in `state` (a plain state_dict of the same
    model); a pruned weight gets it under its mask, which stays (lottery-ticket rewinding)."""
    pruned = masks_of(model)
    with torch.no_grad():
        for key, tensor in model.state_dict(keep_vars=True).items():
            path, _, name = key.rpartition(".")
            if path in pruned and name == "weight_mask":
                continue
            if path in pruned and name == "weight_orig":
                key = f"{path}.weight" if path else "weight"
            tensor.copy_(state[key])


def weight_sparsity(model: nn.Module) -> float:
    """The fraction of zero weights over every conv and linear module of `model`."""
    weights = [effective_weight(module) for module in model.modules()
               if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    total = sum(weight.numel() for weight in weights)
    return sum((weight == 0).sum().item() for weight in weights) / total if total else 0.0
