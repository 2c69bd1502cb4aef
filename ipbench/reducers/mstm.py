"""MSTM, multi-scale token mergence (arXiv 2306.04897), re-implemented from the abstract only.

No code or architecture details are published. The abstract's idea, in a training-free form
(docs/METHODS.md): the tokens the class token attends to most are crucial; each non-crucial
token is not discarded but merged into its most similar crucial token. The multi-scale feature
fusion needs trained weights that do not exist for timm models, so it is an option that fails.
"""

from __future__ import annotations

from torch import Tensor

from ipbench.errors import UserError
from ipbench.reducers.engine import Evidence, TokenState
from ipbench.reducers.knobs import KEEP_RATE
from ipbench.reducers.matching import keep_plan, nearest_plan, rank_tokens
from ipbench.reducers.policy import Param, Policy, keep_count
from ipbench.reducers.spec import register
from ipbench.reducers.trace import record_merge


@register
class MSTM(Policy):
    name = "mstm"
    description = ("MSTM token mergence, RE-IMPLEMENTED FROM THE PAPER'S ABSTRACT (no public code): "
                   "in the pruning blocks the top ⌈ρ(N−1)⌉ tokens by CLS attention are crucial; "
                   "every other token is merged into its most similar crucial token (cosine), "
                   "weighted by size × CLS attention; sizes add")
    PARAMS = (
        Param("keep", "float01", 0.7, "keep rate ρ: ⌈ρ·(N−prefix)⌉ crucial tokens survive each stage"),
        Param("layers", "ints", [3, 6, 9], "0-indexed blocks that merge (as EViT: blocks 4, 7, 10)",
              minimum=0),
        Param("metric", "choice", "keys", "similarity features: head-mean keys or hidden states x",
              choices=("keys", "x")),
        Param("weight", "choice", "size_attn", "merge weights: token size × CLS attention "
              "(size_attn) or size only", choices=("size_attn", "size")),
        Param("prop_attn", "bool", True, "add log(token size) to the attention logits"),
        Param("multiscale", "bool", False, "MSTM's multi-scale feature fusion before merging; "
              "needs a trained checkpoint (none exists for timm models)"),
    )
    needs = frozenset({"cls_attn", "keys"})
    knob = KEEP_RATE
    discard_param = "layers"
    note = "re-implemented from the paper's abstract (no public code)"

    def validate(self) -> None:
        if self.params["multiscale"]:
            raise UserError("mstm: multiscale=true needs MSTM's trained multi-scale fusion weights; "
                            "the paper publishes no code or checkpoint (ipbench knows only its "
                            "abstract), so only the training-free multiscale=false form runs")

    def bind(self, depth: int, n_tokens: int, n_prefix: int) -> None:
        super().bind(depth, n_tokens, n_prefix)
        self._layers = self.layer_set()

    @property
    def prop_attn(self) -> bool:
        return bool(self.params["prop_attn"])

    def acts_at(self, layer: int) -> bool:
        return layer in self._layers and self.params["keep"] < 1.0

    def _kept(self, m: int) -> int | None:
        kept = keep_count(self.params["keep"], m)
        return None if kept >= m else kept

    def tokens_after(self, layer: int, n: int, n_prefix: int) -> int:
        kept = self._kept(n - n_prefix)
        return n if kept is None else n_prefix + kept

    def reduce(self, layer: int, x: Tensor, ev: Evidence, st: TokenState) -> Tensor:
        kept = self._kept(x.shape[1] - st.n_prefix)
        if kept is None:
            return x
        keep, drop = keep_plan(rank_tokens(ev.cls_attn, st.n_prefix), kept, st.n_prefix)
        metric = ev.keys if self.params["metric"] == "keys" else x
        plan = nearest_plan(metric, keep, drop, st.n_prefix)
        weight = None
        if self.params["weight"] == "size_attn":
            # clamp: a crucial token whose attention underflows to 0 must not become 0/0
            weight = st.sizes(x) * ev.cls_attn.unsqueeze(-1).clamp_min(1e-12)
        record_merge(st, self.name, plan, metric, x, ev.cls_attn, metric_name=self.params["metric"])
        return st.merge(x, plan, weight=weight)
