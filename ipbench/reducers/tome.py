"""ToMe: merge r tokens in every block by bipartite soft matching (Bolya et al., ICLR 2023)."""

from __future__ import annotations

from torch import Tensor

from ipbench.errors import UserError
from ipbench.reducers.engine import Evidence, TokenState
from ipbench.reducers.knobs import MergeCount
from ipbench.reducers.matching import alternate_plan
from ipbench.reducers.policy import Param, Policy
from ipbench.reducers.spec import register
from ipbench.reducers.trace import record_merge


@register
class ToMe(Policy):
    name = "tome"
    description = ("ToMe token merging: every block merges r tokens by bipartite matching on "
                   "head-mean keys, size-weighted, proportional attention")
    PARAMS = (
        Param("r", "ints", [8], "tokens merged per block: one value for all blocks or one per "
              "block (capped at half of the unprotected tokens, as in the official code)",
              minimum=0),
        Param("prop_attn", "bool", True, "add log(token size) to the attention logits"),
    )
    needs = frozenset({"keys"})
    # a keep rate ρ gives the constant r whose GMACs match EViT's (default schedule) at ρ
    knob = MergeCount("r", reference="evit")

    def bind(self, depth: int, n_tokens: int, n_prefix: int) -> None:
        super().bind(depth, n_tokens, n_prefix)
        r = self.params["r"]
        if len(r) not in (1, depth):
            raise UserError(f"tome: r has {len(r)} values; give one, or one per block ({depth})")
        self._r = r * depth if len(r) == 1 else list(r)
        half = (n_tokens - n_prefix) // 2
        if self._r[0] > half:
            raise UserError(f"tome: r={self._r[0]} would merge more than half of the "
                            f"{n_tokens - n_prefix} tokens; at most r={half}")

    @property
    def prop_attn(self) -> bool:
        return bool(self.params["prop_attn"])

    def acts_at(self, layer: int) -> bool:
        return self._r[layer] > 0

    def _r_at(self, layer: int, n: int, n_prefix: int) -> int:
        return min(self._r[layer], (n - n_prefix) // 2)

    def tokens_after(self, layer: int, n: int, n_prefix: int) -> int:
        return n - self._r_at(layer, n, n_prefix)

    def reduce(self, layer: int, x: Tensor, ev: Evidence, st: TokenState) -> Tensor:
        n = x.shape[1]
        r = self._r_at(layer, n, st.n_prefix)
        if r <= 0:
            return x
        plan = alternate_plan(ev.keys, r, st.n_prefix)
        record_merge(st, self.name, plan, ev.keys, x, ev.cls_attn)
        return st.merge(x, plan)
