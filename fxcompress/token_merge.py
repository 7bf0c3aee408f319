"""Token reduction math for vision transformers: bipartite matching, folding, pooling, random drop.

Pure tensor functions, no FX. Tokens are `[B, N, C]`; the first `protected` tokens (the CLS token and
any other prefix tokens) are set aside before any reduction and put back in front unchanged, so they are
never merged. Each token carries a size (how many input tokens it stands for, `[B, N, 1]`) and a position
(the smallest input index among them, `[B, N]`).

FOLDER / ToMe matching: the unprotected tokens are split into even (A) and odd (B) positions; each A token
proposes its most similar B token (cosine similarity of a metric, e.g. head-averaged keys), optionally
lowered by `alpha` times the CLS attention of both tokens (scaled to max 1) so that tokens the CLS relies
on are merged last; the `r` best proposals are merged into their B token by size-weighted averaging.
One round removes at most |A| = ceil(M / 2) of M tokens; "folding" repeats rounds in the same layer until
the budget is met (577 -> 289 -> 193).

`REDUCERS` maps each method to its reduction and `reduce` is the one entry point: the module path
(`tokens.reduce`) and the graph path (`reduce_step`, inserted by `merge_tokens`) both call it, with the same
prefix tokens and the same metric, so one `TokenConfig` gives one model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass
class TokenSet:
    x: Tensor  # [B, N, C]
    size: Tensor  # [B, N, 1], input tokens each token stands for
    position: Tensor  # [B, N], smallest input index among them

    @classmethod
    def of(cls, x: Tensor) -> "TokenSet":
        batch, count = x.shape[:2]
        position = torch.arange(count, device=x.device).expand(batch, count)
        return cls(x, x.new_ones(batch, count, 1), position)

    def __len__(self) -> int:
        return self.x.shape[1]


@dataclass(frozen=True)
class Matching:
    """Indices into the A (even) and B (odd) halves of the unprotected tokens."""

    unmerged: Tensor  # [B, |A| - r] A tokens that stay, in input order
    source: Tensor  # [B, r] A tokens merged away
    destination: Tensor  # [B, r] the B token each of them is merged into


def bipartite_matching(metric: Tensor, r: int, importance: Tensor | None = None, alpha: float = 0.0) -> Matching:
    """Match the `r` most similar (A, B) pairs of `metric` `[B, M, D]` (unprotected tokens only).

    `importance` `[B, M]` (CLS attention) lowers the score of a pair by `alpha * (imp_a + imp_b)`.
    """
    metric = F.normalize(metric.float(), dim=-1)
    a, b = metric[:, ::2], metric[:, 1::2]
    if not 0 <= r <= a.shape[1] or (r and b.shape[1] == 0):
        raise ValueError(f"cannot merge {r} of {metric.shape[1]} tokens in one round")
    scores = a @ b.transpose(1, 2)
    if importance is not None and alpha:
        weight = importance.float() / importance.float().amax(dim=1, keepdim=True).clamp(min=1e-12)
        scores = scores - alpha * (weight[:, ::2, None] + weight[:, None, 1::2])
    best, destination = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    source = order[:, :r]
    unmerged = order[:, r:].sort(dim=-1).values
    return Matching(unmerged, source, destination.gather(1, source))


def merge(x: Tensor, matching: Matching, reduce: str = "sum") -> Tensor:
    """Apply a matching to any per-token tensor `[B, M, ...]`: [A tokens kept] + [B tokens, sources reduced in]."""
    a, b = x[:, ::2], x[:, 1::2]

    def index(i: Tensor) -> Tensor:
        return i.view(*i.shape, *([1] * (x.dim() - 2))).expand(*i.shape, *x.shape[2:])

    kept = a.gather(1, index(matching.unmerged))
    source = a.gather(1, index(matching.source))
    b = b.scatter_reduce(1, index(matching.destination), source, reduce=reduce)
    return torch.cat([kept, b], dim=1)


def merge_round(tokens: TokenSet, metric: Tensor, r: int, protected: int = 1, importance: Tensor | None = None,
                alpha: float = 0.0) -> tuple[TokenSet, Tensor, Tensor | None]:
    """One round of matching on the unprotected tokens: size-weighted average of features and metric,
    sizes and CLS attention summed, positions the smallest. Returns the tokens, metric and importance."""
    p = protected
    body_importance = importance[:, p:] if importance is not None else None
    matching = bipartite_matching(metric[:, p:], r, body_importance, alpha)
    size = tokens.size[:, p:]
    new_size = merge(size, matching)

    def weighted(t: Tensor) -> Tensor:
        return torch.cat([t[:, :p], merge(t[:, p:] * size, matching) / new_size], dim=1)

    merged = TokenSet(weighted(tokens.x), torch.cat([tokens.size[:, :p], new_size], dim=1),
                      torch.cat([tokens.position[:, :p], merge(tokens.position[:, p:], matching, "amin")], dim=1))
    if importance is not None:
        importance = torch.cat([importance[:, :p], merge(importance[:, p:], matching)], dim=1)
    return merged, weighted(metric), importance


def fold_counts(count: int, target: int, protected: int = 1) -> list[int]:
    """Token counts after each folding round from `count` down to `target` (577, 193 -> [289, 193])."""
    counts = []
    while count > target:
        count -= min(count - target, math.ceil((count - protected) / 2))
        counts.append(count)
    return counts


def fold(tokens: TokenSet, metric: Tensor, target: int, protected: int = 1, importance: Tensor | None = None,
         alpha: float = 0.0) -> TokenSet:
    """Merge rounds until `target` tokens are left (FOLDER's repeated matching in one layer)."""
    current = len(tokens)
    for count in fold_counts(current, target, protected):
        tokens, metric, importance = merge_round(tokens, metric, current - count, protected, importance, alpha)
        current = count
    return tokens


def pool_count(count: int, target: int, protected: int = 1) -> int:
    """Tokens left by `pool`: a square grid whose side is the one nearest to the requested budget."""
    if target >= count:
        return count
    return protected + max(1, round(math.sqrt(target - protected))) ** 2


def pool(tokens: TokenSet, target: int, protected: int = 1) -> TokenSet:
    """Average the unprotected tokens over a coarser grid (size-weighted); a square grid of tokens is pooled
    in 2-D, anything else in contiguous runs of positions. Leaves `pool_count(...)` tokens."""
    count, p = len(tokens), protected
    kept = pool_count(count, target, p) - p
    if kept + p >= count:
        return tokens
    body = count - p
    side, new_side = math.isqrt(body), math.isqrt(kept)
    index = torch.arange(body, device=tokens.x.device)
    if side * side == body:
        cell = (index // side * new_side // side) * new_side + index % side * new_side // side
    else:
        cell = index * kept // body
    assign = F.one_hot(cell, kept).to(tokens.x.dtype)  # [body, kept]
    size = tokens.size[:, p:]
    new_size = torch.einsum("bnk,nm->bmk", size, assign)
    x = torch.einsum("bnc,nm->bmc", tokens.x[:, p:] * size, assign) / new_size
    position = (tokens.position[:, p:, None] + (1 - assign[None]) * count).amin(dim=1).long()
    return TokenSet(torch.cat([tokens.x[:, :p], x], 1), torch.cat([tokens.size[:, :p], new_size], 1),
                    torch.cat([tokens.position[:, :p], position], 1))


def drop(tokens: TokenSet, target: int, protected: int = 1, generator: torch.Generator | None = None) -> TokenSet:
    """Keep a uniformly random subset of the unprotected tokens, in their order (the random-drop baseline)."""
    p = protected
    if target >= len(tokens):
        return tokens
    scores = torch.rand(tokens.x.shape[0], len(tokens) - p, generator=generator, device=tokens.x.device)
    keep = scores.topk(target - p, dim=1).indices.sort(dim=1).values
    return gather(tokens, keep, p)


def gather(tokens: TokenSet, index: Tensor, protected: int = 1) -> TokenSet:
    """The protected tokens followed by the unprotected tokens at `index` `[B, K]`."""
    p = protected

    def take(t: Tensor) -> Tensor:
        i = index.view(*index.shape, *([1] * (t.dim() - 2))).expand(*index.shape, *t.shape[2:])
        return torch.cat([t[:, :p], t[:, p:].gather(1, i)], dim=1)

    return TokenSet(take(tokens.x), take(tokens.size), take(tokens.position))


def restore_order(tokens: TokenSet, protected: int = 1) -> TokenSet:
    """Sort the unprotected tokens back into input (spatial) order by their positions."""
    order = tokens.position[:, protected:].argsort(dim=1)
    return gather(tokens, order, protected)


def attention_bias(size: Tensor, dtype: torch.dtype) -> Tensor:
    """Proportional attention: log(size) added to the logits of each key, `[B, 1, 1, N]`."""
    return size.log().to(dtype)[:, None, None, :, 0]


def head_average(keys: Tensor) -> Tensor:
    """The matching metric: an attention's keys `[B, H, N, d]` averaged over heads, `[B, N, d]`."""
    return keys.mean(dim=1)


def projected_keys(key: Tensor, in_proj_weight: Tensor, in_proj_bias: Tensor | None, num_heads: int) -> Tensor:
    """The keys `[B, H, N, d]` that `F.multi_head_attention_forward` computes from its packed in-projection
    and its time-major key input `[N, B, E]` (torchvision's ViT attention, opaque in a dynamo graph)."""
    keys = F.linear(key, in_proj_weight, in_proj_bias).chunk(3, dim=-1)[1]
    return keys.unflatten(-1, (num_heads, -1)).permute(1, 2, 0, 3)


@dataclass(frozen=True)
class Step:
    """One scheduled reduction: the tokens left after it, the prefix tokens set aside, what matching reads."""

    target: int
    protected: int
    metric: Tensor | None = None  # head-averaged keys [B, N, d]: folder, tome
    importance: Tensor | None = None  # CLS attention [B, N], for alpha
    alpha: float = 0.0


def _match(tokens: TokenSet, step: Step) -> TokenSet:
    if step.metric is None:
        raise ValueError("token matching needs the head-averaged keys of the layer's attention")
    return fold(tokens, step.metric, step.target, step.protected, step.importance, step.alpha)


REDUCERS: dict[str, Callable[[TokenSet, Step], TokenSet]] = {
    "folder": _match,  # bipartite matching on keys, folded rounds in a few late layers
    "tome": _match,  # the same matching, the schedule spreads it over every layer
    "pool": lambda tokens, step: pool(tokens, step.target, step.protected),  # grid average (baseline)
    "drop": lambda tokens, step: drop(tokens, step.target, step.protected),  # random subset (baseline)
}
MATCHING = ("folder", "tome")  # the methods that read `Step.metric`


def reduce(tokens: TokenSet, method: str, step: Step, restore: bool = False) -> TokenSet:
    """The one token reduction both paths run (`reduce_tokens` on modules, `merge_tokens` on graphs)."""
    tokens = REDUCERS[method](tokens, step)
    return restore_order(tokens, step.protected) if restore else tokens


def reduce_step(x: Tensor, size: Tensor | None, position: Tensor | None, keys: Tensor | None, *, method: str,
                target: int, protected: int, restore: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The graph pass's op: `reduce` on a layer's output `x` with the keys `[B, H, N, d]` of its attention
    (None for pool and drop); returns the tokens, their sizes and positions, which the next one takes back."""
    tokens = TokenSet.of(x) if size is None else TokenSet(x, size, position)
    metric = None if keys is None else head_average(keys)
    tokens = reduce(tokens, method, Step(target, protected, metric), restore)
    return tokens.x, tokens.size, tokens.position
