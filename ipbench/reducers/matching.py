"""Pure tensor functions shared by every reducer: choose tokens, merge them, fuse them.

Every reduction step is described by index tensors (which input token becomes which output
slot), so one pair of functions applies it to the hidden states, the sizes, the centroids
and the trace alike. Nothing here knows about modules or policies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class MergePlan:
    """How N input tokens become M output tokens.

    keep: [B, M] input index of each output slot, in output order.
    src:  [B, R] input indices of the tokens merged into another token.
    dst:  [B, R] output slot (0..M-1) that receives each src token.
    Tokens in neither keep nor src are discarded.
    """

    keep: Tensor
    src: Tensor
    dst: Tensor

    @property
    def n_out(self) -> int:
        return self.keep.shape[1]


def _expand(idx: Tensor, t: Tensor) -> Tensor:
    """[B, M] indices as [B, M, C] for t's C channels (a view; none needed for C = 1: sizes)."""
    idx = idx.unsqueeze(-1)
    return idx if t.shape[-1] == 1 else idx.expand(-1, -1, t.shape[-1])


_ARANGES: dict[tuple[int, int, int, torch.device], Tensor] = {}


def cached_arange(start: int, end: int, step: int, device: torch.device) -> Tensor:
    """torch.arange(start, end, step) made once per device and kept: a forward asks for the same
    few index ranges in every block. Made outside inference mode, so that a training forward may
    use it too. Under torch.compile a plain arange (a constant of the graph): a cache filled while
    tracing fails dynamo's guard on the next call and the whole model compiles again."""
    if torch.compiler.is_compiling():
        return torch.arange(start, end, step, device=device)
    key = (start, end, step, device)
    t = _ARANGES.get(key)
    if t is None:
        with torch.inference_mode(False):
            t = _ARANGES[key] = torch.arange(start, end, step, device=device)
    return t


def positions(n: int, bsz: int, device: torch.device) -> Tensor:
    """[B, n] token positions 0..n-1 for every image (the prefix every keep-list starts with)."""
    return cached_arange(0, n, 1, device).expand(bsz, -1)


_ROWS_FROM = 16  # channels from which whole rows are copied instead of gathered element by element


def gather_tokens(t: Tensor, idx: Tensor) -> Tensor:
    """t[b, idx[b, j]] for a [B, N, C] tensor and [B, M] indices.

    Hidden states (contiguous, wide) are copied row by row with index_select on the flattened
    batch: a gather with its index expanded over C reads one index per element, 4-5x slower on
    CPU at batch 1 and at batch 32. Narrow or strided bookkeeping (sizes, centroids) is gathered.
    """
    bsz, n, c = t.shape
    if c < _ROWS_FROM or not t.is_contiguous():
        return t.gather(1, _expand(idx, t))
    rows = idx.reshape(-1) if bsz == 1 else (idx + cached_arange(0, bsz * n, n, idx.device)[:, None]).reshape(-1)
    return t.reshape(bsz * n, c).index_select(0, rows).view(bsz, idx.shape[1], c)


def merge_sum(t: Tensor, plan: MergePlan) -> Tensor:
    """Sum each merged token into its destination slot (sizes, patch sets)."""
    out = gather_tokens(t, plan.keep)
    if plan.src.shape[1]:  # in place: the gather made a new tensor (and its backward needs no output)
        out.scatter_add_(1, _expand(plan.dst, out), gather_tokens(t, plan.src))
    return out


def merge_weighted(t: Tensor, weight: Tensor, plan: MergePlan, total: Tensor | None = None) -> Tensor:
    """Weighted average of each output slot's members (ToMe's size-weighted merge).

    weight is [B, N, 1]; a slot with a single member keeps its value exactly. `total`, where the
    caller has it already (the merged sizes), is ``merge_sum(weight, plan)``: not computed again.
    """
    if not plan.src.shape[1]:
        return gather_tokens(t, plan.keep)
    return merge_sum(t * weight, plan) / (merge_sum(weight, plan) if total is None else total)


def alternate_starts(n_prefix: int) -> tuple[int, int]:
    """First positions of ToMe's A and B sets: A = even absolute positions, B = odd, prefix left out.

    Keeping the absolute parity makes the split identical to the official code for one class
    token, while every prefix token (distillation, registers) stays protected.
    """
    return n_prefix + n_prefix % 2, n_prefix + 1 - n_prefix % 2


def bipartite_match(
    metric: Tensor, a_idx: Tensor, b_idx: Tensor, r: int, score_bias: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Bipartite soft matching between token sets A and B.

    metric: [B, N, C] (normalised inside); a_idx [B, Na], b_idx [B, Nb] token indices.
    score_bias: optional [B, Na, Nb] added to the cosine scores (e.g. a locality penalty).
    Each A token takes its most similar B token; the r A tokens with the highest scores are
    merged. Returns (src, dst_b, unm): src [B, r] and unm [B, Na-r] are positions in A
    (unm sorted, so the survivors keep their order), dst_b [B, r] are positions in B.
    """
    m = metric / metric.norm(dim=-1, keepdim=True)
    return match_sets(gather_tokens(m, a_idx), gather_tokens(m, b_idx), r, score_bias)


def match_sets(ma: Tensor, mb: Tensor, r: int, score_bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """`bipartite_match` on the two sets' normalised metrics ma [B, Na, C], mb [B, Nb, C] (a
    strided view for ToMe's alternate split: no gather); the same (src, dst_b, unm)."""
    scores = ma @ mb.transpose(1, 2)
    if score_bias is not None:
        scores = scores + score_bias
    best, best_b = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    src = order[:, :r]
    unm = order[:, r:].sort(dim=-1).values
    return src, best_b.gather(1, src), unm


def alternate_plan(metric: Tensor, r: int, n_prefix: int) -> MergePlan:
    """MergePlan of ToMe's step on its alternate split (`alternate_starts`): output = [prefix,
    unmerged A (in order), B (merged into)]. The sets are strided views of the metric, not gathers;
    their positions come from cached ranges (A's i-th token is a0 + 2i), looked up, not computed."""
    bsz, n, _ = metric.shape
    a0, b0 = alternate_starts(n_prefix)
    m = metric / metric.norm(dim=-1, keepdim=True)
    src, dst_b, unm = match_sets(m[:, a0::2], m[:, b0::2], r)
    dev = metric.device
    a_pos = cached_arange(a0, n, 2, dev).expand(bsz, -1)
    keep = torch.cat([positions(n_prefix, bsz, dev), a_pos.gather(1, unm),
                      cached_arange(b0, n, 2, dev).expand(bsz, -1)], dim=1)
    return MergePlan(keep=keep, src=a_pos.gather(1, src), dst=dst_b + (n_prefix + unm.shape[1]))


def rank_tokens(score: Tensor, n_prefix: int) -> Tensor:
    """Indices of the non-prefix tokens, most important first. score: [B, N]."""
    return score[:, n_prefix:].argsort(dim=-1, descending=True) + n_prefix


def keep_plan(order: Tensor, n_keep: int, n_prefix: int) -> tuple[Tensor, Tensor]:
    """Split a ranking into (kept indices with the prefix in front, dropped indices)."""
    prefix = positions(n_prefix, order.shape[0], order.device)
    return torch.cat([prefix, order[:, :n_keep]], dim=1), order[:, n_keep:]


def fuse_tokens(x: Tensor, weight: Tensor, idx: Tensor) -> Tensor:
    """EViT's fused token: Σ weight_i · x_i over the given tokens, weights not renormalised.

    x [B, N, C], weight [B, N] (the CLS attention), idx [B, D] -> [B, 1, C].
    """
    w = weight.gather(1, idx).unsqueeze(-1)
    return (gather_tokens(x, idx) * w).sum(dim=1, keepdim=True)


def false_first(flags: Tensor) -> Tensor:
    """Indices [B, N] of a [B, N] bool mask's False positions, then of its True ones, each group in
    its order (a stable partition: the survivors of a removal, or the picks of a sampling, in order)."""
    return flags.to(torch.int8).argsort(dim=-1, stable=True)


def remaining(n: int, removed: Tensor) -> Tensor:
    """The indices 0..n-1 except `removed` [B, R], in order: [B, n − R]."""
    mask = torch.zeros(removed.shape[0], n, dtype=torch.bool, device=removed.device).scatter_(1, removed, 1)
    return false_first(mask)[:, : n - removed.shape[1]]


def ordered_merge_plan(n_tokens: int, src: Tensor, dst: Tensor) -> MergePlan:
    """MergePlan merging input tokens src [B, R] into input tokens dst [B, R] (dst not in src).

    Every other token keeps its input position order, so a trace's indices stay readable and
    untouched (semantic) tokens are not reshuffled.
    """
    bsz, r = src.shape
    removed = torch.zeros(bsz, n_tokens, dtype=torch.bool, device=src.device).scatter_(1, src, 1)
    keep = false_first(removed)[:, : n_tokens - r]
    slot = torch.arange(n_tokens, device=src.device) - removed.cumsum(dim=1)
    return MergePlan(keep=keep, src=src, dst=slot.gather(1, dst))


def raster_sort(idx: Tensor, pos: Tensor) -> Tensor:
    """Reorder token indices idx [B, K] by the raster order (row, then column) of their
    centroids pos [B, N, 2]; ties keep their order."""
    p = gather_tokens(pos, idx)
    order = p[..., 1].argsort(dim=1, stable=True)
    order = order.gather(1, p[..., 0].gather(1, order).argsort(dim=1, stable=True))
    return idx.gather(1, order)


def locality_penalty(pos: Tensor, a_idx: Tensor, b_idx: Tensor, lam: float, scale: float) -> Tensor:
    """Score bias [B, Na, Nb]: −λ · (distance between the tokens' centroids) / scale."""
    return torch.cdist(gather_tokens(pos, a_idx), gather_tokens(pos, b_idx)) * (-lam / scale)


def nearest_plan(metric: Tensor, keep: Tensor, drop: Tensor, n_prefix: int) -> MergePlan:
    """MergePlan sending each dropped token to its most similar kept token (cosine of metric).

    keep [B, M] lists the prefix first (as keep_plan returns it); prefix tokens never receive.
    """
    return nearest_match(metric, keep, drop, n_prefix)[0]


def nearest_match(metric: Tensor, keep: Tensor, drop: Tensor, n_prefix: int) -> tuple[MergePlan, Tensor]:
    """`nearest_plan` and each dropped token's cosine with the token it goes to ([B, D])."""
    m = metric / metric.norm(dim=-1, keepdim=True)
    sims = gather_tokens(m, drop) @ gather_tokens(m, keep[:, n_prefix:]).transpose(1, 2)
    best, where = sims.max(dim=-1)
    return MergePlan(keep=keep, src=drop, dst=where + n_prefix), best


def pair_cosine(t: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """Cosine similarity [B, R] between tokens t[b, i[b, r]] and t[b, j[b, r]]."""
    return torch.nn.functional.cosine_similarity(gather_tokens(t, i), gather_tokens(t, j), dim=-1)
