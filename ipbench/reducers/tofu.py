"""ToFu: token fusion, pruning where the model is non-linear and merging where it is near-linear
(Kim et al., WACV 2024). No official code exists: this follows the implementation in hchautran/PiToMe
@550b5de (algo/tofu), which is what published comparisons ran.

Every block finds r = ⌊N − N·ratio⌋ pairs by ToMe's bipartite matching on the head-mean keys (N
counts the class token, as that code does). In the first half of the blocks the matched sources
are dropped (pruning); later they are fused into their destination: the unweighted mean of the group,
rescaled by (largest norm in the group) / (destination's norm before the merge) — MLERP's norm
preservation as that code writes it. Sizes are not tracked there, so no proportional attention.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ipbench.reducers.engine import Evidence, TokenState
from ipbench.reducers.knobs import CostMatched, ratio_grid
from ipbench.reducers.matching import MergePlan, alternate_plan, gather_tokens
from ipbench.reducers.policy import Param, Policy
from ipbench.reducers.spec import register
from ipbench.reducers.trace import record_merge


def norm_rescaled_mean(x: Tensor, mean: Tensor, plan: MergePlan) -> Tensor:
    """ToFu's fused tokens: each slot that received a source takes its mean × (max norm among its
    members) / (its own norm before); the other slots are left as they are."""
    norms = x.norm(dim=-1, keepdim=True)
    own = gather_tokens(norms, plan.keep)
    top = own.scatter_reduce(1, plan.dst.unsqueeze(-1), gather_tokens(norms, plan.src), reduce="amax")
    received = torch.zeros_like(own, dtype=torch.bool).scatter_(1, plan.dst.unsqueeze(-1), 1)
    return torch.where(received, mean / own * top, mean)


@register
class ToFu(Policy):
    name = "tofu"
    description = ("ToFu token fusion (no official code; as implemented in the PiToMe repository): ToMe "
                   "matching on keys in every block, the sources pruned in the first half of the blocks "
                   "and fused (norm-preserving mean) after")
    PARAMS = (
        Param("ratio", "float01", 0.9125, "share of the tokens (class token counted, as that code does) "
              "each block keeps; at least 0.5", minimum=0.5),
        Param("prune_blocks", "int", -1, "blocks 0..this one prune, the later ones fuse (-1: L//2, "
              "that code's split)", minimum=-1),
    )
    needs = frozenset({"keys"})
    knob = CostMatched("ratio", ratio_grid(0.5))
    note = "no official code; follows the implementation in hchautran/PiToMe"

    def acts_at(self, layer: int) -> bool:
        return self.params["ratio"] < 1.0

    def _r(self, n: int, n_prefix: int) -> int:
        return min(math.floor(n - n * self.params["ratio"]), (n - n_prefix) // 2)

    def tokens_after(self, layer: int, n: int, n_prefix: int) -> int:
        return n - self._r(n, n_prefix)

    def reduce(self, layer: int, x: Tensor, ev: Evidence, st: TokenState) -> Tensor:
        r = self._r(x.shape[1], st.n_prefix)
        if r <= 0:
            return x
        plan = alternate_plan(ev.keys, r, st.n_prefix)
        assert self.depth is not None
        last_pruning = self.depth // 2 if self.params["prune_blocks"] < 0 else self.params["prune_blocks"]
        if layer <= last_pruning:
            return st.keep(x, plan.keep)
        record_merge(st, self.name, plan, ev.keys, x, ev.cls_attn)
        mean = st.merge(x, plan, weight=torch.ones_like(x[..., :1]))
        return norm_rescaled_mean(x, mean, plan)
