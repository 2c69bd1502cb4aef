"""Traces: what a reducer did to which tokens, block by block, and the analyses built on them.

Tracing is off by default and costs nothing then. With ``apply_reducer(model, policy,
tracing=True)`` (or ``set_tracing(model, True)``) a forward leaves ``model._ipb.last_trace``: a
list of entries (dicts of tensors, batch first), in forward order. Per block ``layer``:

- ``op="attn"``: the tokens entering the block's reduction, with the block's evidence:
  ``n_prefix``, ``grid`` (patch rows, cols), ``cls_attn`` [B, N] (head-mean CLS attention row),
  ``size`` [B, N, 1] or None (all ones), ``source`` [B, N, P] (patches of each token), ``pos``.
  Recorded in every block, acting or not, so a token can be followed through the network.
- one entry per reduction step of a policy, in the order they ran; indices refer to the input
  sequence OF THAT STEP (in an ``a+b`` combination, the second step sees the first's output):
  ``op="merge"`` (tokens ``src`` [B, R] merged into tokens ``dst`` [B, R]), ``op="prune"``
  (ImagePiece's ``retok=prune``: the same pairs, ``src`` dropped instead), ``op="keep"``
  (``keep`` [B, M] survive, ``drop`` [B, D] discarded, or fused into one token when ``fused``).
  Every step entry has ``policy``, ``n_prefix``, ``n_in``, ``cls_attn`` (the evidence that step
  used), ``source`` of its input tokens; merge/prune entries also ``sim_metric``/``sim_x`` [B, R]
  (cosine of each pair on the matching metric and on the hidden states) and ``metric``.
- ``op="out"``: the tokens leaving the block (``size``, ``source``, ``pos``).

Tensors in entries are shared with the forward, never copied: a trace costs little memory.
The analyses below return per-layer values for ONE trace (one batch); ``Share`` counts add up
over batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ipbench.reducers.matching import MergePlan, pair_cosine, rank_tokens

if TYPE_CHECKING:
    from torch import nn

    from ipbench.reducers.engine import TokenState

Trace = list[dict[str, Any]]
STEP_OPS = ("merge", "prune", "keep")


# -- recording (called by policies; no-ops unless tracing) --------------------------------------

def record_merge(st: TokenState, policy: str, plan: MergePlan, metric: Tensor, x: Tensor,
                 cls_attn: Tensor | None, *, op: str = "merge", metric_name: str = "keys",
                 **extra: Any) -> None:
    """Record a merge step (call BEFORE applying it: sources and indices are the inputs')."""
    if st.trace is None:
        return
    dst = plan.keep.gather(1, plan.dst)
    st.record(op=op, policy=policy, n_prefix=st.n_prefix, n_in=x.shape[1], src=plan.src, dst=dst,
              sim_metric=pair_cosine(metric.float(), plan.src, dst),
              sim_x=pair_cosine(x.float(), plan.src, dst), metric=metric_name, cls_attn=cls_attn,
              size=st.size, source=st.source, **extra)


def record_keep(st: TokenState, policy: str, keep: Tensor, drop: Tensor, cls_attn: Tensor | None,
                fused: bool, **extra: Any) -> None:
    """Record a keep/discard step (call BEFORE applying it)."""
    if st.trace is None:
        return
    st.record(op="keep", policy=policy, n_prefix=st.n_prefix, n_in=keep.shape[1] + drop.shape[1],
              keep=keep, drop=drop, fused=fused, cls_attn=cls_attn, size=st.size, source=st.source,
              **extra)


# -- access -------------------------------------------------------------------------------------

def get_trace(model: nn.Module) -> Trace:
    """The last forward's trace of a model patched with tracing on."""
    trace = getattr(getattr(model, "_ipb", None), "last_trace", None)
    if trace is None:
        raise ValueError("no trace: apply_reducer(..., tracing=True) and run a forward first")
    return trace


def entries(trace: Trace, op: str | Iterable[str], layer: int | None = None,
            policy: str | None = None) -> list[dict[str, Any]]:
    """The entries of one kind (optionally of one block and/or one policy), in order."""
    ops = {op} if isinstance(op, str) else set(op)
    return [e for e in trace if e["op"] in ops and (layer is None or e["layer"] == layer)
            and (policy is None or e.get("policy") == policy)]


def _one(trace: Trace, op: str, layer: int) -> dict[str, Any] | None:
    found = entries(trace, op, layer)
    return found[0] if found else None


# -- small pure helpers -------------------------------------------------------------------------

def top_count(frac: float, n: int) -> int:
    """How many of n tokens form the top `frac` (⌊frac·n⌋, robust to float rounding).

    This equals the number of semantic tokens ImagePiece leaves, n − ⌈(1−ρ)·n⌉, for frac = ρ.
    """
    return min(n, max(0, math.floor(frac * n + 1e-9)))


def token_ranks(score: Tensor, n_prefix: int) -> Tensor:
    """Rank [B, N] of each token by score among the non-prefix tokens (0 = highest); prefix −1.

    Ties are broken exactly as the policies break them (same sort).
    """
    order = rank_tokens(score, n_prefix)
    ranks = torch.full(score.shape, -1, dtype=torch.long, device=score.device)
    ar = torch.arange(order.shape[1], device=score.device).expand_as(order)
    return ranks.scatter(1, order, ar)


def patch_owner(source: Tensor) -> Tensor:
    """For each patch, the index of the token that contains it; −1 if none does. [B, P]."""
    s = source > 0
    return torch.where(s.any(dim=1), s.to(torch.int8).argmax(dim=1), -1)


def first_patch(source: Tensor) -> Tensor:
    """A representative patch of each token (its first), −1 for tokens without patches. [B, N]."""
    s = source > 0
    return torch.where(s.any(dim=2), s.to(torch.int8).argmax(dim=2), -1)


@dataclass
class Share:
    """hits out of total; adds up over batches."""

    hits: int = 0
    total: int = 0

    @property
    def value(self) -> float:
        return self.hits / self.total if self.total else float("nan")

    def __add__(self, other: Share) -> Share:
        return Share(self.hits + other.hits, self.total + other.total)


def add_shares(per_batch: Iterable[dict[int, Share]]) -> dict[int, Share]:
    """Sum per-layer shares over several traces (batches)."""
    out: dict[int, Share] = {}
    for d in per_batch:
        for k, v in d.items():
            out[k] = out.get(k, Share()) + v
    return out


# -- (a) similarity of merged pairs (paper Tables 6 and 8) --------------------------------------

def merged_pair_similarity(trace: Trace, on: str = "metric", policy: str | None = None,
                           op: str = "merge") -> dict[int, Tensor]:
    """Per block, the cosine similarity of every merged (src, dst) pair, flattened over images.

    on: 'metric' (what the policy matched on: head-mean keys by default) or 'x' (hidden states).
    """
    key = {"metric": "sim_metric", "x": "sim_x"}[on]
    out: dict[int, list[Tensor]] = {}
    for e in entries(trace, op, policy=policy):
        out.setdefault(e["layer"], []).append(e[key].reshape(-1))
    return {k: torch.cat(v) for k, v in out.items()}


def mean_merged_pair_similarity(trace: Trace, on: str = "metric", policy: str | None = None) -> dict[int, float]:
    """Mean of `merged_pair_similarity` per block (blocks without merges are left out)."""
    return {k: v.float().mean().item() for k, v in merged_pair_similarity(trace, on, policy).items()
            if v.numel()}


# -- (b) are the merged tokens attentive? (paper Table 7) ---------------------------------------

def merged_top_share(trace: Trace, p: float, tokens: str = "src", policy: str | None = None) -> dict[int, Share]:
    """Per block, how many merged tokens lie in the top-p fraction by that step's CLS attention.

    tokens: 'src' (the tokens merged away: ToMe's set A tokens) or 'both' (src and their
    destinations). The top set holds top_count(p, N − prefix) tokens; a random choice of
    tokens gives a share of about p.
    """
    out: dict[int, Share] = {}
    for e in entries(trace, "merge", policy=policy):
        n_prefix = e["n_prefix"]
        ranks = token_ranks(e["cls_attn"], n_prefix)
        top = top_count(p, e["n_in"] - n_prefix)
        idx = e["src"] if tokens == "src" else torch.cat([e["src"], e["dst"]], dim=1)
        if tokens == "both":  # a destination that receives several tokens counts once
            hit_mask = torch.zeros_like(ranks, dtype=torch.bool).scatter(1, idx, True)
            hits = ((ranks < top) & (ranks >= 0) & hit_mask).sum().item()
            total = hit_mask.sum().item()
        else:
            r = ranks.gather(1, idx)
            hits, total = ((r < top) & (r >= 0)).sum().item(), idx.numel()
        out[e["layer"]] = out.get(e["layer"], Share()) + Share(int(hits), int(total))
    return out


# -- (c) following tokens across blocks (paper Table 5) -----------------------------------------

SCORES = ("token", "patch")


def attention_score(entry: dict[str, Any], score: str = "token") -> Tensor:
    """What ranks a block's tokens as attentive: 'token' = the CLS attention each token draws;
    'patch' = that attention divided by the token's size (patches it holds), so a merged token is
    attentive by what its content draws, not by the log(size) boost proportional attention gives it."""
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; valid: {', '.join(SCORES)}")
    size = entry.get("size")
    if score == "token" or size is None:
        return entry["cls_attn"]
    return entry["cls_attn"] / size[..., 0].to(entry["cls_attn"].dtype)


def follow_tokens(trace: Trace, layer: int, score: str = "token") -> tuple[Tensor, Tensor, Tensor]:
    """Follow the tokens entering block `layer`'s reduction into block layer+1.

    Returns (rank_before [B, N], rank_after [B, N], next_idx [B, N]): each token's rank by
    `attention_score` in block `layer`, the rank in block layer+1 of the token that then contains
    its patches, and that token's index (−1 where its patches were discarded, or for prefix tokens).
    """
    a, b = _one(trace, "attn", layer), _one(trace, "attn", layer + 1)
    if a is None or b is None:
        raise ValueError(f"the trace has no attention record for block {layer if a is None else layer + 1}")
    rank_before = token_ranks(attention_score(a, score), a["n_prefix"])
    rank_next = token_ranks(attention_score(b, score), b["n_prefix"])
    rep = first_patch(a["source"])
    owner = patch_owner(b["source"])
    next_idx = torch.where(rep >= 0, owner.gather(1, rep.clamp_min(0)), -1)
    rank_after = torch.where(next_idx >= 0, rank_next.gather(1, next_idx.clamp_min(0)), -1)
    return rank_before, rank_after, next_idx


def inattentive_to_attentive(trace: Trace, keep: float, population: str = "merged",
                             policy: str | None = "imagepiece", score: str = "token") -> dict[int, Share]:
    """Per re-tokenize block l, the share of inattentive tokens that are attentive in block l+1.

    Attentive = inside the top `keep` fraction by CLS attention of the block (top_count).
    population: 'merged' counts the inattentive tokens that took part in a merge at l (as
    src or dst: those that were re-tokenized); 'inattentive' counts all inattentive tokens.
    Re-tokenize blocks = blocks with a merge step of `policy` (None: of any policy).
    score: what ranks tokens in both blocks (`attention_score`: 'token' or 'patch').
    """
    out: dict[int, Share] = {}
    layers = sorted({e["layer"] for e in entries(trace, "merge", policy=policy)})
    for layer in layers:
        if _one(trace, "attn", layer + 1) is None:
            continue
        a = _one(trace, "attn", layer)
        assert a is not None
        before, after, _ = follow_tokens(trace, layer, score)
        n_prefix = a["n_prefix"]
        inatt = before >= top_count(keep, a["cls_attn"].shape[1] - n_prefix)
        if population == "merged":
            merged_patches = torch.zeros_like(a["source"][:, 0], dtype=torch.bool)
            for e in entries(trace, "merge", layer=layer, policy=policy):
                idx = torch.cat([e["src"], e["dst"]], dim=1)
                members = e["source"].gather(1, idx.unsqueeze(-1).expand(-1, -1, e["source"].shape[-1]))
                merged_patches |= (members > 0).any(dim=1)
            rep = first_patch(a["source"])
            inatt &= (rep >= 0) & merged_patches.gather(1, rep.clamp_min(0))
        b = _one(trace, "attn", layer + 1)
        assert b is not None
        top_next = top_count(keep, b["cls_attn"].shape[1] - b["n_prefix"])
        hits = (inatt & (after >= 0) & (after < top_next)).sum().item()
        out[layer] = Share(int(hits), int(inatt.sum().item()))
    return out


# -- (d) token groups for visualisation ---------------------------------------------------------

def token_groups(trace: Trace, layer: int) -> Tensor:
    """Patches of each token leaving block `layer`: bool [B, N_out, P]."""
    e = _one(trace, "out", layer)
    if e is None:
        raise ValueError(f"the trace has no output record for block {layer}")
    return e["source"] > 0


def group_map(trace: Trace, layer: int) -> Tensor:
    """Label image [B, rows, cols]: the index of the token holding each patch after block
    `layer` (−1: discarded). Tokens with one label form one group in a figure."""
    e = _one(trace, "out", layer)
    if e is None:
        raise ValueError(f"the trace has no output record for block {layer}")
    rows, cols = e["grid"]
    return patch_owner(e["source"]).reshape(-1, rows, cols)


# -- flat records -------------------------------------------------------------------------------

def to_records(trace: Trace) -> list[dict[str, Any]]:
    """One row per (step, image): plain numbers for a CSV or a DataFrame."""
    rows: list[dict[str, Any]] = []
    for e in trace:
        if e["op"] not in STEP_OPS:
            continue
        bsz = e["cls_attn"].shape[0] if e.get("cls_attn") is not None else e["source"].shape[0]
        for i in range(bsz):
            row: dict[str, Any] = {"layer": e["layer"], "op": e["op"], "policy": e["policy"],
                                   "image": i, "tokens_in": e["n_in"]}
            if e["op"] == "keep":
                row.update(kept=e["keep"].shape[1] - e["n_prefix"], dropped=e["drop"].shape[1],
                           fused=bool(e["fused"]))
            else:
                row.update(merged=e["src"].shape[1],
                           sim_metric=e["sim_metric"][i].float().mean().item() if e["src"].shape[1]
                           else float("nan"),
                           sim_x=e["sim_x"][i].float().mean().item() if e["src"].shape[1]
                           else float("nan"))
            rows.append(row)
    return rows
