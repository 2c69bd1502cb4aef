"""Zero-TPrune: token pruning from the attention graph (Wang, Dedhia, Jha, CVPR 2024),
RE-IMPLEMENTED FROM THE PAPER (no public code; docs/reducers.md lists every choice made here).

A pruning block treats its attention matrix as a directed graph and ranks tokens by Weighted Page
Rank, s ← Aᵀs (the attention a token receives, weighted by the importance of who attends), per head;
heads are combined by root-mean-square (EIR) over the heads whose score variance lies in a range
(VHF). First a one-step ranking splits the patches into a less and a more important half; the
S-stage drops the less important tokens most similar (key cosine) to the other half; then the I-stage
runs the full Page Rank on the remaining graph and keeps the top tokens. Nothing is merged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ipbench.errors import UserError
from ipbench.reducers.engine import Evidence, TokenState
from ipbench.reducers.knobs import KEEP_RATE
from ipbench.reducers.matching import gather_tokens, positions, remaining
from ipbench.reducers.policy import Param, Policy, keep_count
from ipbench.reducers.spec import register


def page_rank(attn: Tensor, iters: int, cls_boost: bool) -> Tensor:
    """Weighted Page Rank per head: s_j ← Σ_i A_ij s_i, `iters` times, from s⁰ ∝ (√N, 1, …, 1)
    with the class token boosted, else uniform. attn [B, H, N, N] (rows sum to 1) -> [B, H, N],
    each head's scores summing to 1 (Aᵀ is column-stochastic: no renormalisation needed)."""
    bsz, heads, n, _ = attn.shape
    s = attn.new_ones(bsz, heads, n)
    if cls_boost:
        s[..., 0] = math.sqrt(n)
    s = s / s.sum(dim=-1, keepdim=True)
    for _ in range(iters):
        s = torch.einsum("bhij,bhi->bhj", attn, s)
    return s


def combine_heads(s: Tensor, low: float, high: float) -> Tensor:
    """EIR over the VHF heads: sqrt(mean of s² over the heads whose variance of N·s (scores on a
    mean-1 scale, over all N tokens) lies in [low, high]); all heads where none does. [B, H, N] -> [B, N]."""
    n = s.shape[-1]
    var = (n * s).var(dim=-1, unbiased=False)
    use = ((var >= low) & (var <= high)).to(s.dtype)
    use = torch.where(use.sum(dim=1, keepdim=True) == 0, torch.ones_like(use), use)
    return ((s * s * use.unsqueeze(-1)).sum(dim=1) / use.sum(dim=1, keepdim=True)).sqrt()


def sub_graph(attn: Tensor, idx: Tensor) -> Tensor:
    """The attention among the tokens idx [B, M] only, rows renormalised (the pruned nodes removed)."""
    bsz, heads, n, _ = attn.shape
    m = idx.shape[1]
    rows = attn.gather(2, idx.view(bsz, 1, m, 1).expand(-1, heads, -1, n))
    sub = rows.gather(3, idx.view(bsz, 1, 1, m).expand(-1, heads, m, -1))
    return sub / sub.sum(dim=-1, keepdim=True)


@register
class ZeroTPrune(Policy):
    name = "zerotprune"
    description = ("Zero-TPrune, RE-IMPLEMENTED FROM THE PAPER (no public code): in the pruning blocks drop "
                   "the less important tokens most similar to the important half (S-stage), then keep the "
                   "top ⌈ρ(N−1)⌉ by Weighted Page Rank on the attention graph (I-stage)")
    PARAMS = (
        Param("keep", "float01", 0.7, "keep rate ρ: ⌈ρ·(N−prefix)⌉ patch tokens survive each pruning block"),
        Param("layers", "ints", [3, 6, 9], "0-indexed pruning blocks (ipbench's choice, as EViT's; the "
              "paper's own placements are not published in usable form)", minimum=0),
        Param("similarity_share", "float", 0.5, "share of each block's removed tokens that the S-stage "
              "chooses (the rest by importance)", minimum=0),
        Param("iters", "ints", [30, 5, 1], "Page Rank iterations in the first three / middle / last three "
              "blocks (the paper: 30-50, 5-10 and 1)", minimum=1),
        Param("vhf_low", "float", 0.01, "VHF: heads whose variance of N·s is below this are left out", minimum=0),
        Param("vhf_high", "float", 0.7, "VHF: heads whose variance of N·s is above this are left out", minimum=0),
        Param("cls_boost", "bool", True, "start the class token at √N times the others (false: uniform, "
              "the paper's Zero-TPrune-uni)"),
    )
    needs = frozenset({"attn", "keys"})
    combinable = False
    knob = KEEP_RATE
    discard_param = "layers"
    note = "re-implemented from the paper (no public code)"

    def validate(self) -> None:
        if not 0.0 <= self.params["similarity_share"] <= 1.0:
            raise UserError(f"zerotprune: similarity_share must be in [0, 1], got {self.params['similarity_share']:g}")
        if len(self.params["iters"]) != 3:
            raise UserError("zerotprune: iters takes three counts (first three, middle, last three blocks)")
        if self.params["vhf_low"] > self.params["vhf_high"]:
            raise UserError("zerotprune: vhf_low must not exceed vhf_high")

    def bind(self, depth: int, n_tokens: int, n_prefix: int) -> None:
        super().bind(depth, n_tokens, n_prefix)
        self._layers = self.layer_set()

    def acts_at(self, layer: int) -> bool:
        return layer in self._layers and self.params["keep"] < 1.0

    def _split(self, n: int, n_prefix: int) -> tuple[int, int]:
        """Tokens the S-stage and the I-stage remove at a block entered by n tokens."""
        m = n - n_prefix
        r = m - keep_count(self.params["keep"], m)
        r_s = math.floor(r * self.params["similarity_share"])
        return r_s, r - r_s

    def _iters(self, layer: int) -> int:
        first, middle, last = self.params["iters"]
        assert self.depth is not None
        return first if layer < 3 else last if layer >= self.depth - 3 else middle

    def tokens_after(self, layer: int, n: int, n_prefix: int) -> int:
        return n - sum(self._split(n, n_prefix))

    def extra_macs(self, layer: int, n: int, n_prefix: int, heads: int, head_dim: int, dim: int) -> int:
        r_s, _ = self._split(n, n_prefix)
        m, half = n - n_prefix, (n - n_prefix) // 2
        after_s = n - r_s
        return heads * n * n + (m - half) * half * head_dim + self._iters(layer) * heads * after_s * after_s

    def _scores(self, attn: Tensor, iters: int) -> Tensor:
        return combine_heads(page_rank(attn, iters, self.params["cls_boost"]), self.params["vhf_low"],
                             self.params["vhf_high"])

    def reduce(self, layer: int, x: Tensor, ev: Evidence, st: TokenState) -> Tensor:
        n, p = x.shape[1], st.n_prefix
        r_s, r_i = self._split(n, p)
        if r_s + r_i <= 0:
            return x
        attn = ev.attn.float()
        keep = positions(n, x.shape[0], x.device)
        if r_s > 0:  # I'-stage ranking (one step), then the S-stage on the less important half
            order = self._scores(attn, 1)[:, p:].argsort(dim=-1, descending=True) + p
            half = (n - p) // 2
            low, high = order[:, half:], order[:, :half]
            k = ev.keys / ev.keys.norm(dim=-1, keepdim=True)
            sim = (gather_tokens(k, low) @ gather_tokens(k, high).transpose(1, 2)).amax(dim=-1)
            keep = remaining(n, low.gather(1, sim.topk(r_s, dim=-1).indices))
            attn = sub_graph(attn, keep)
        if r_i > 0:  # I-stage: full Page Rank on the remaining graph, the top tokens kept in order
            score = self._scores(attn, self._iters(layer))[:, p:]
            drop = score.topk(r_i, dim=-1, largest=False).indices + p
            keep = keep.gather(1, remaining(keep.shape[1], drop))
        return st.keep(x, keep)
