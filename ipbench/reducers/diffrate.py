"""DiffRate: prune, then merge, with per-block token counts (Chen et al., ICCV 2023).

The counts were searched once by the authors (3 epochs on ImageNet) and are applied here, as in the
official code's off-the-shelf evaluation, to unchanged weights: in each block the tokens are ranked by
the class token's attention (head mean, after the size-biased softmax), the top `prune[i]` survive,
and the least important of those are merged until `merge[i]` remain, each into its most similar more
important token by the cosine of the hidden states. The merge is an unweighted mean, and the merged
token's size grows by the source's size times that cosine (official code: "benefit to the accuracy of
off-the-shelf model"); sizes bias the attention.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ipbench.errors import UserError
from ipbench.reducers.engine import Evidence, TokenState
from ipbench.reducers.knobs import CostMatched
from ipbench.reducers.matching import nearest_match, positions, rank_tokens
from ipbench.reducers.policy import Param, Policy
from ipbench.reducers.spec import register
from ipbench.reducers.trace import record_merge

# The official compression_rate.json (OpenGVLab/DiffRate @91ae3e3), DeiT entries: per published
# GMACs target, the tokens (class token included) after pruning and after merging in each block.
# Keyed by the model's width: DeiT-Ti 192, DeiT-S 384, DeiT-B 768 (12 blocks, 196 patches + CLS).
Schedules = dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
PUBLISHED: dict[int, Schedules] = {
    192: {
        "0.6": ((197, 196, 180, 157, 130, 107, 86, 73, 63, 51, 40, 3),
               (197, 187, 167, 139, 114, 90, 76, 66, 57, 45, 37, 3)),
        "0.7": ((197, 196, 194, 180, 150, 123, 98, 82, 68, 60, 52, 3),
               (197, 196, 192, 158, 133, 103, 88, 72, 64, 58, 49, 3)),
        "0.8": ((197, 197, 196, 186, 166, 147, 117, 103, 92, 80, 74, 3),
               (197, 196, 190, 172, 154, 125, 107, 96, 84, 78, 70, 3)),
        "0.9": ((197, 197, 196, 190, 182, 166, 141, 125, 113, 105, 99, 3),
               (197, 196, 194, 188, 172, 147, 129, 115, 107, 103, 96, 3)),
        "1.0": ((197, 197, 196, 194, 188, 184, 178, 164, 156, 137, 129, 21),
               (197, 197, 196, 190, 186, 154, 148, 156, 145, 135, 125, 21)),
    },
    384: {
        "2.3": ((197, 192, 168, 143, 121, 105, 92, 74, 62, 45, 33, 3),
               (197, 180, 156, 127, 109, 98, 80, 66, 52, 37, 31, 3)),
        "2.5": ((197, 192, 174, 156, 131, 115, 111, 99, 76, 50, 39, 3),
               (197, 186, 160, 133, 119, 107, 96, 82, 66, 43, 37, 3)),
        "2.7": ((197, 196, 182, 160, 141, 127, 115, 105, 88, 66, 49, 3),
               (197, 188, 170, 147, 131, 119, 109, 96, 76, 54, 45, 3)),
        "2.9": ((197, 196, 190, 168, 150, 139, 129, 117, 99, 78, 58, 3),
               (197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3)),
        "3.1": ((197, 197, 194, 180, 160, 147, 137, 129, 115, 92, 76, 3),
               (197, 196, 186, 164, 150, 141, 133, 121, 103, 78, 68, 3)),
    },
    768: {
        "8.7": ((197, 192, 172, 156, 131, 107, 90, 72, 56, 33, 17, 3),
               (197, 178, 162, 141, 115, 96, 78, 60, 47, 21, 13, 3)),
        "10.0": ((197, 194, 182, 168, 148, 129, 113, 101, 82, 49, 25, 3),
                (197, 186, 174, 156, 137, 117, 105, 90, 66, 31, 19, 3)),
        "10.4": ((197, 196, 188, 174, 156, 141, 121, 103, 90, 58, 25, 3),
                (197, 190, 184, 164, 145, 131, 107, 94, 74, 31, 21, 3)),
        "11.5": ((197, 197, 197, 188, 170, 154, 139, 123, 107, 72, 43, 3),
                (197, 197, 192, 178, 158, 145, 127, 111, 94, 50, 35, 3)),
        "12.5": ((197, 197, 196, 192, 184, 170, 154, 139, 129, 94, 58, 3),
                (197, 196, 194, 190, 176, 160, 145, 131, 115, 68, 47, 3)),
    },
}
# The default target per width: the published schedule nearest 63 % of the model's cost (DeiT-S 2.9
# is the README's headline off-the-shelf number, 79.54 %; DeiT-Ti has none in the README).
AUTO = {192: 0.8, 384: 2.9, 768: 11.5}
# The sweep's candidates: every 0.01 GMACs across each width's published range.
GRID = tuple(round(lo + i / 100, 2) for lo, hi in ((0.6, 1.0), (2.3, 3.1), (8.7, 12.5))
             for i in range(round((hi - lo) * 100) + 1))


def interpolated(table: Schedules, target: float) -> tuple[list[int], list[int]]:
    """The published schedule for `target`, or between two published ones the counts interpolated
    linearly (rounded) between its neighbours: ipbench's choice, so a budget between the authors'
    points can be met; the published points themselves are exact."""
    keys = sorted(table, key=float)
    for key in keys:
        if abs(float(key) - target) < 1e-9:
            return list(table[key][0]), list(table[key][1])
    hi = next(k for k in keys if float(k) > target)
    lo = keys[keys.index(hi) - 1]
    w = (target - float(lo)) / (float(hi) - float(lo))
    prune, merge = ([round(a + (b - a) * w) for a, b in zip(table[lo][i], table[hi][i])] for i in (0, 1))
    return prune, merge


@register
class DiffRate(Policy):
    name = "diffrate"
    description = ("DiffRate: per block, keep the top prune[i] tokens by CLS attention, then merge the "
                   "least important into their most similar kept token (hidden-state cosine) until "
                   "merge[i] remain; the authors' published per-block counts, training-free")
    PARAMS = (
        Param("target", "float", 0.0, "GMACs target of the published schedule (DeiT-Ti 0.6-1.0, DeiT-S "
              "2.3-3.1, DeiT-B 8.7-12.5; between two published targets the counts are interpolated); "
              "0: 0.8 / 2.9 / 11.5", minimum=0),
        Param("prune", "ints", [], "tokens (class token included) after pruning in each block; "
              "with merge, replaces the published schedule", minimum=1),
        Param("merge", "ints", [], "tokens after merging in each block (with prune)", minimum=1),
    )
    needs = frozenset({"cls_attn"})
    knob = CostMatched("target", lambda costs: GRID)
    note = ("published off-the-shelf schedules of the official code (compression_rate.json); between two "
            "published targets the counts are interpolated")
    _width: int | None = None

    def validate(self) -> None:
        if bool(self.params["prune"]) != bool(self.params["merge"]):
            raise UserError("diffrate: give prune and merge together (one count per block each)")
        if self.params["prune"] and "target" in self.given:
            raise UserError("diffrate: give either target or prune/merge, not both")

    @property
    def prop_attn(self) -> bool:
        return True  # the official code always adds log(size) (its sizes start at ones)

    def observe(self, model: nn.Module) -> None:
        self._width = int(getattr(model, "embed_dim", 0))

    def _schedule(self, depth: int, n_tokens: int) -> tuple[list[int], list[int]]:
        if self.params["prune"]:
            prune, merge = list(self.params["prune"]), list(self.params["merge"])
            if len(prune) != depth or len(merge) != depth:
                raise UserError(f"diffrate: prune and merge need one count per block ({depth}); "
                                f"got {len(prune)} and {len(merge)}")
            return prune, merge
        tables = PUBLISHED.get(self._width or 0)
        if tables is None or depth != 12 or n_tokens != 197:
            raise UserError(f"diffrate: the published schedules are for DeiT-Ti/S/B (12 blocks, 197 tokens, "
                            f"widths 192/384/768); this model has {depth} blocks, {n_tokens} tokens, width "
                            f"{self._width}: give prune=... and merge=... (one count per block)")
        target = self.params["target"] or AUTO[self._width]
        low, high = min(map(float, tables)), max(map(float, tables))
        if not low - 1e-9 <= target <= high + 1e-9:
            raise UserError(f"diffrate: target {target:g} is outside the published range for width "
                            f"{self._width}: {low:g} to {high:g} (published: {', '.join(tables)})")
        return interpolated(tables, target)

    def bind(self, depth: int, n_tokens: int, n_prefix: int) -> None:
        super().bind(depth, n_tokens, n_prefix)
        self._prune, self._merge = self._schedule(depth, n_tokens)

    def _counts(self, layer: int, n: int) -> tuple[int, int]:
        """Tokens after pruning and after merging here (counts past the current one do nothing)."""
        kept = min(n, self._prune[layer])
        return kept, min(kept, self._merge[layer])

    def acts_at(self, layer: int) -> bool:
        return min(self._prune[layer], self._merge[layer]) < self.n_tokens

    def extra_macs(self, layer: int, n: int, n_prefix: int, heads: int, head_dim: int, dim: int) -> int:
        kept, merged = self._counts(layer, n)
        return (kept - merged) * max(merged - n_prefix, 0) * dim  # sources × destinations cosines

    def tokens_after(self, layer: int, n: int, n_prefix: int) -> int:
        return max(self._counts(layer, n)[1], n_prefix)

    def reduce(self, layer: int, x: Tensor, ev: Evidence, st: TokenState) -> Tensor:
        n, p = x.shape[1], st.n_prefix
        kept, merged = self._counts(layer, n)
        kept, merged = max(kept, p), max(merged, p)
        if merged >= n:
            return x
        order = rank_tokens(ev.cls_attn, p)
        prefix = positions(p, x.shape[0], x.device)
        if merged == kept:
            return st.keep(x, torch.cat([prefix, order[:, :kept - p]], dim=1))
        dst = torch.cat([prefix, order[:, :merged - p]], dim=1)
        plan, cos = nearest_match(x, dst, order[:, merged - p:kept - p], p)
        record_merge(st, self.name, plan, x, x, ev.cls_attn, metric_name="x")
        scale = torch.ones_like(x[..., :1]).scatter(1, plan.src.unsqueeze(-1), cos.unsqueeze(-1).to(x.dtype))
        return st.merge(x, plan, weight=torch.ones_like(x[..., :1]), size_scale=scale)
