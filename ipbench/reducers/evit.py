"""EViT: keep the tokens the class token attends to most, fuse the rest (Liang et al., ICLR 2022).

Top-K is EViT without the fused token.
"""

from __future__ import annotations

from torch import Tensor

from ipbench.reducers.engine import Evidence, TokenState
from ipbench.reducers.knobs import KEEP_RATE
from ipbench.reducers.matching import keep_plan, rank_tokens
from ipbench.reducers.policy import Param, Policy, keep_count
from ipbench.reducers.spec import register
from ipbench.reducers.trace import record_keep

KEEP = Param("keep", "float01", 0.7, "keep rate ρ: ⌈ρ·(N−prefix)⌉ tokens survive each stage")
LAYERS = Param("layers", "ints", [3, 6, 9], "0-indexed blocks that prune (EViT: blocks 4, 7, 10)",
               minimum=0)
FUSED_SIZE = Param("fused_size", "choice", "one", "size of the fused token in attention: one "
                   "(official EViT, no bias) or count (patches absorbed, log-size bias)",
                   choices=("one", "count"))


@register
class EViT(Policy):
    name = "evit"
    description = ("EViT: in the pruning blocks keep the top ⌈ρ(N−1)⌉ tokens by CLS attention "
                   "and fuse the rest into one token (Σ attention·x), appended last")
    PARAMS = (KEEP, Param("fuse", "bool", True, "fuse the dropped tokens into one extra token"),
              LAYERS, FUSED_SIZE)
    needs = frozenset({"cls_attn"})
    knob = KEEP_RATE
    discard_param = "layers"

    def validate(self) -> None:
        self.fuse: bool = self.params["fuse"]
        self.fused_size: str = self.params["fused_size"]

    def bind(self, depth: int, n_tokens: int, n_prefix: int) -> None:
        super().bind(depth, n_tokens, n_prefix)
        self._layers = self.layer_set()

    @property
    def prop_attn(self) -> bool:
        return self.fuse and self.fused_size == "count"

    def acts_at(self, layer: int) -> bool:
        return layer in self._layers and self.params["keep"] < 1.0

    def _kept(self, n: int, n_prefix: int) -> int | None:
        """Tokens kept at a pruning block, None when the keep rate removes nothing."""
        k = keep_count(self.params["keep"], n - n_prefix)
        return None if k >= n - n_prefix else k

    def tokens_after(self, layer: int, n: int, n_prefix: int) -> int:
        k = self._kept(n, n_prefix)
        return n if k is None else n_prefix + k + int(self.fuse)

    def reduce(self, layer: int, x: Tensor, ev: Evidence, st: TokenState) -> Tensor:
        k = self._kept(x.shape[1], st.n_prefix)
        if k is None:
            return x
        keep, drop = keep_plan(rank_tokens(ev.cls_attn, st.n_prefix), k, st.n_prefix)
        record_keep(st, self.name, keep, drop, ev.cls_attn, self.fuse)
        if self.fuse:
            return st.keep(x, keep, fuse=drop, weight=ev.cls_attn, fused_size=self.fused_size)
        return st.keep(x, keep)


@register
class TopK(EViT):
    name = "topk"
    description = "Top-K pruning: EViT without the fused token (dropped tokens are discarded)"
    PARAMS = (KEEP, LAYERS)

    def validate(self) -> None:
        self.fuse = False
        self.fused_size = "one"
