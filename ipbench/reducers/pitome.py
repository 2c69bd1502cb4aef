"""PiToMe: spectrum-preserving token merging (Tran et al., NeurIPS 2024).

Every block removes r = ⌊T − T·ratio⌋ of its T patch tokens. A token's energy is the mean of
ELU(cos − margin) over all tokens (head-mean keys): high energy means it sits in a large cluster of
similar tokens, so it can be merged. The first half of the blocks merges by ToMe's bipartite matching
on the energy-sorted order (alternate ranks as the two sets); the later blocks merge only the 2r
highest-energy tokens, each of one half into its best match in the other, and protect the rest.
Size-weighted averages; sizes do not bias the attention (official code: hchautran/PiToMe @550b5de).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ipbench.errors import UserError
from ipbench.reducers.engine import Evidence, TokenState
from ipbench.reducers.knobs import CostMatched, ratio_grid
from ipbench.reducers.matching import MergePlan, bipartite_match, gather_tokens, positions
from ipbench.reducers.policy import Param, Policy
from ipbench.reducers.spec import register
from ipbench.reducers.trace import record_merge


def energy_order(keys: Tensor, margin: float, alpha: float) -> Tensor:
    """Patch positions by descending energy, mean_j ELU(cos(k_i, k_j) − margin) (diagonal included).
    keys [B, T, C] -> [B, T]."""
    k = keys / keys.norm(dim=-1, keepdim=True)
    energy = torch.nn.functional.elu(k @ k.transpose(1, 2) - margin, alpha=alpha).mean(dim=-1)
    return energy.argsort(dim=-1, descending=True)


def protected_plan(keys: Tensor, order: Tensor, r: int, n_prefix: int) -> MergePlan:
    """PiToMe's later blocks: of the 2r highest-energy tokens (absolute indices `order`), the even
    ranks merge each into its most similar odd rank; output = [prefix, protected, odd ranks]."""
    bsz = order.shape[0]
    a, b, protected = order[:, : 2 * r : 2], order[:, 1 : 2 * r : 2], order[:, 2 * r :]
    k = keys / keys.norm(dim=-1, keepdim=True)
    dst_b = (gather_tokens(k, a) @ gather_tokens(k, b).transpose(1, 2)).argmax(dim=-1)
    prefix = positions(n_prefix, bsz, keys.device)
    keep = torch.cat([prefix, protected, b], dim=1)
    return MergePlan(keep=keep, src=a, dst=dst_b + (n_prefix + protected.shape[1]))


def sorted_bipartite_plan(keys: Tensor, order: Tensor, r: int, n_prefix: int) -> MergePlan:
    """PiToMe's first blocks: ToMe's step with the sets alternating over the energy order."""
    bsz = order.shape[0]
    a, b = order[:, 0::2], order[:, 1::2]
    src, dst_b, unm = bipartite_match(keys, a, b, r)
    prefix = positions(n_prefix, bsz, keys.device)
    keep = torch.cat([prefix, a.gather(1, unm), b], dim=1)
    return MergePlan(keep=keep, src=a.gather(1, src), dst=dst_b + (n_prefix + unm.shape[1]))


@register
class PiToMe(Policy):
    name = "pitome"
    description = ("PiToMe: every block merges ⌊T(1−ratio)⌋ tokens chosen by energy (mean ELU of key "
                   "cosines minus a margin); bipartite matching in the first half of the blocks, "
                   "high-energy tokens only (the rest protected) after")
    PARAMS = (
        Param("ratio", "float01", 0.9125, "share of the patch tokens each block keeps (official --ratio "
              "default; off-the-shelf sweeps 0.9-0.975); at least 0.5", minimum=0.5),
        Param("margin", "float", 0.75, "energy margin of block 0; block l uses margin·(1 − l/L)"),
        Param("alpha", "float", 1.0, "ELU's α in the energy", minimum=0),
        Param("bsm_share", "float", 0.5, "share of the blocks, from the first, that merge by bipartite "
              "matching over the energy order (official: the first ⌈L/2⌉)", minimum=0),
    )
    needs = frozenset({"keys"})
    knob = CostMatched("ratio", ratio_grid(0.5))

    def validate(self) -> None:
        if self.params["bsm_share"] > 1:
            raise UserError(f"pitome: bsm_share must be in [0, 1], got {self.params['bsm_share']:g}")

    def acts_at(self, layer: int) -> bool:
        return self.params["ratio"] < 1.0

    def _r(self, n: int, n_prefix: int) -> int:
        t = n - n_prefix
        return math.floor(t - t * self.params["ratio"])

    def tokens_after(self, layer: int, n: int, n_prefix: int) -> int:
        return n - self._r(n, n_prefix)

    def extra_macs(self, layer: int, n: int, n_prefix: int, heads: int, head_dim: int, dim: int) -> int:
        return (n - n_prefix) ** 2 * head_dim  # the energy's T×T cosine graph

    def reduce(self, layer: int, x: Tensor, ev: Evidence, st: TokenState) -> Tensor:
        p = st.n_prefix
        r = self._r(x.shape[1], p)
        if r <= 0:
            return x
        assert self.depth is not None
        margin = self.params["margin"] * (1 - layer / self.depth)
        order = energy_order(ev.keys[:, p:], margin, self.params["alpha"]) + p
        if layer < math.ceil(self.params["bsm_share"] * self.depth):
            plan = sorted_bipartite_plan(ev.keys, order, r, p)
        else:
            plan = protected_plan(ev.keys, order, r, p)
        record_merge(st, self.name, plan, ev.keys, x, ev.cls_attn)
        return st.merge(x, plan)
