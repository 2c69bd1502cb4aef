"""PPT: token pruning or pooling, chosen per image and block (Wu et al., arXiv 2310.01812).

In each listed block the tokens are scored as in ATS, s_j ∝ (class-token attention to j) · ‖v_j‖,
normalised over the patches. A flat score distribution (variance below a threshold) means no token
stands out: the image's r tokens are pooled by ToMe's bipartite matching on the keys. A peaked one
means some tokens matter: the r lowest-scored are pruned. Both remove r tokens, so a batch keeps one
token count; official code: xjwu1024/PPT @706bcdd (ppt_deit.py).
"""

from __future__ import annotations

from torch import Tensor

from ipbench.reducers.engine import Evidence, TokenState
from ipbench.reducers.knobs import CostMatched
from ipbench.reducers.matching import alternate_plan, keep_plan
from ipbench.reducers.policy import Param, Policy
from ipbench.reducers.spec import register


def ppt_scores(cls_attn: Tensor, vnorm: Tensor, n_prefix: int) -> Tensor:
    """The patches' significance [B, N−prefix]: CLS attention × value norm, summing to 1 per image
    (the official code sums the attention over heads; the head mean gives the same normalised score)."""
    s = cls_attn[:, n_prefix:] * vnorm[:, n_prefix:]
    return s / s.sum(dim=-1, keepdim=True)


def pools(scores: Tensor, threshold: float) -> Tensor:
    """Which images pool [B]: the unbiased variance of their scores strictly below the threshold."""
    return scores.var(dim=-1) < threshold


@register
class PPT(Policy):
    name = "ppt"
    description = ("PPT: in the listed blocks each image loses r tokens, pooled by ToMe matching when "
                   "its attention·‖v‖ scores are flat (variance < threshold), else pruned by score")
    PARAMS = (
        Param("r", "int", 50, "tokens removed per listed block (capped at half of the patch tokens, "
              "as in the official code); the official off-the-shelf DeiT-S setting is 50", minimum=0),
        Param("layers", "ints", [3, 6, 9], "0-indexed blocks that prune or pool (official pp_loc_list)",
              minimum=0),
        Param("threshold", "float", 7e-5, "score variance below which an image pools instead of pruning "
              "(official off-the-shelf value; 0: always prune, 1: always pool)", minimum=0),
        Param("prop_attn", "bool", True, "add log(token size) to the attention logits"),
    )
    needs = frozenset({"cls_attn", "keys", "vnorm"})
    combinable = False
    knob = CostMatched("r", lambda costs: range(costs.n_patches // 2 + 1))
    discard_param = "layers"

    def bind(self, depth: int, n_tokens: int, n_prefix: int) -> None:
        super().bind(depth, n_tokens, n_prefix)
        self._layers = self.layer_set()

    @property
    def prop_attn(self) -> bool:
        return bool(self.params["prop_attn"])

    def acts_at(self, layer: int) -> bool:
        return layer in self._layers and self.params["r"] > 0

    def _r(self, n: int, n_prefix: int) -> int:
        return min(self.params["r"], (n - n_prefix) // 2)

    def tokens_after(self, layer: int, n: int, n_prefix: int) -> int:
        return n - self._r(n, n_prefix)

    def reduce(self, layer: int, x: Tensor, ev: Evidence, st: TokenState) -> Tensor:
        n, p = x.shape[1], st.n_prefix
        r = self._r(n, p)
        if r <= 0:
            return x
        scores = ppt_scores(ev.cls_attn, ev.vnorm, p)
        order = scores.argsort(dim=-1, descending=True) + p
        keep, _ = keep_plan(order, n - p - r, p)
        return st.choose(x, pools(scores, self.params["threshold"]),
                         lambda t: st.merge(t, alternate_plan(ev.keys, r, p)),
                         lambda t: st.keep(t, keep))
