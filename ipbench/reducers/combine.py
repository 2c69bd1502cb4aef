"""``a+b``: several reducers in one model, acting in the order written.

In every block, each policy that acts there reduces the tokens in turn. A later policy sees the
earlier one's output, and the evidence of the block (CLS attention, keys) re-indexed through
that reduction: a merged token's CLS attention is the sum of its members' (the attention mass
it now stands for) and its key the size-weighted mean (as its hidden state); a fused token's
attention is the sum of the fused ones' and its key their attention-weighted sum. Sizes, so
proportional attention, are shared; it is on when any part wants it.

Policies may adapt to a combination (`Policy.in_combination`): ImagePiece then contributes only
its re-tokenization and leaves discarding to its partner, so ``imagepiece+evit`` is the paper's
full model and ``imagepiece+tome`` is re-tokenization plus ToMe (the paper's Table 9 pairings).

Ill-defined combinations are UserErrors: a reducer twice, ``none`` in a combination, two
policies discarding in the same block, or a part that forbids proportional attention combined
with one that needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ipbench.errors import UserError
from ipbench.reducers.engine import Evidence, TokenState
from ipbench.reducers.matching import (
    MergePlan,
    fuse_tokens,
    gather_tokens,
    merge_sum,
    merge_weighted,
)
from ipbench.reducers.policy import Policy
from ipbench.reducers.spec import set_combiner

if TYPE_CHECKING:
    from ipbench.reducers.knobs import Knob

def reindex_after_merge(ev: Evidence, plan: MergePlan, size: Tensor, weight: Tensor | None) -> Evidence:
    """The evidence of the tokens after a merge (see the module docstring)."""
    cls = merge_sum(ev.cls_attn.unsqueeze(-1), plan)[..., 0] if ev.cls_attn is not None else None
    keys = merge_weighted(ev.keys, size if weight is None else weight, plan) if ev.keys is not None else None
    return Evidence(cls_attn=cls, keys=keys)


def reindex_after_keep(ev: Evidence, idx: Tensor, fuse: Tensor | None, weight: Tensor | None) -> Evidence:
    """The evidence of the tokens after a keep (and fuse) step."""
    cls, keys = ev.cls_attn, ev.keys
    if cls is not None:
        kept = cls.gather(1, idx)
        cls = kept if fuse is None else torch.cat([kept, cls.gather(1, fuse).sum(1, keepdim=True)], 1)
    if keys is not None:
        kept_k = gather_tokens(keys, idx)
        if fuse is not None and weight is not None:
            kept_k = torch.cat([kept_k, fuse_tokens(keys, weight, fuse)], dim=1)
        keys = kept_k
    return Evidence(cls_attn=cls, keys=keys)


class _Reindexing:
    """A TokenState stand-in: reductions go to the real state and re-index the evidence that
    the next policy of the same block will read. Everything else is the real state's."""

    def __init__(self, st: TokenState, ev: Evidence) -> None:
        self._st = st
        self.ev = ev

    def __getattr__(self, name: str) -> Any:
        return getattr(self._st, name)

    def merge(self, x: Tensor, plan: MergePlan, weight: Tensor | None = None) -> Tensor:
        self.ev = reindex_after_merge(self.ev, plan, self._st.sizes(x), weight)
        return self._st.merge(x, plan, weight=weight)

    def keep(self, x: Tensor, idx: Tensor, fuse: Tensor | None = None, weight: Tensor | None = None,
             fused_size: str = "one") -> Tensor:
        self.ev = reindex_after_keep(self.ev, idx, fuse, weight)
        return self._st.keep(x, idx, fuse=fuse, weight=weight, fused_size=fused_size)


class Combination(Policy):
    """Several policies applied in order in each block (built by parse_spec for ``a+b``)."""

    name = "combination"
    description = __doc__ or ""

    def __init__(self, parts: list[Policy]) -> None:
        names = [p.name for p in parts]
        if "none" in names:
            raise UserError("'none' cannot be combined with other reducers (it reduces nothing)")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise UserError(f"{'+'.join(names)}: {dup[0]} appears twice; each reducer at most once "
                            "(give it a per-block list instead)")
        alone = [p.name for p in parts if not p.combinable]
        if alone:
            raise UserError(f"{'+'.join(names)}: {alone[0]} cannot be combined with other reducers "
                            "(its evidence or its per-image token count is not re-indexed through a "
                            "partner's reduction); run it on its own")
        for i, p in enumerate(parts):
            p.in_combination(parts[:i] + parts[i + 1:])
        self._parts = parts
        self.name = "+".join(names)  # type: ignore[misc]
        self.params: dict[str, Any] = {p.name: p.shown_params() for p in parts}
        self.given: dict[str, Any] = {p.name: p.given for p in parts}
        self._text: str | None = None
        self.needs = frozenset().union(*(p.needs for p in parts))  # type: ignore[misc]
        self.training_free = all(p.training_free for p in parts)  # type: ignore[misc]
        self.adaptive = any(p.adaptive for p in parts)  # type: ignore[misc]
        self.depth = None
        self.n_tokens = self.n_prefix = 0
        want = self.prop_attn
        for p in parts:
            if "prop_attn" in p.params and bool(p.params["prop_attn"]) != want:
                raise UserError(f"{self.name}: {p.name} has prop_attn={str(p.params['prop_attn']).lower()} "
                                f"but the combination {'needs' if want else 'has no'} proportional "
                                "attention (sizes are shared); set prop_attn the same way for all parts")
        self._check_discards()

    def _check_discards(self) -> None:
        seen: dict[int, str] = {}
        for p in self.parts:
            key = type(p).discard_param
            for layer in p.params.get(key, []) if key else []:
                if layer in seen:
                    raise UserError(f"{self.name}: {seen[layer]} and {p.name} both discard tokens in "
                                    f"block {layer}; give them different blocks")
                seen[layer] = p.name

    @property
    def parts(self) -> list[Policy]:
        return list(self._parts)

    @property
    def spec(self) -> str:
        return "+".join(p.spec for p in self.parts)

    def _rebuilt(self, change: dict[str, dict[str, Any]]) -> Combination:
        """The same parts, each rebuilt from the parameters its spec gave (before the combination
        adapted it), with `change[name]` on top."""
        return Combination([p.with_params(**change.get(p.name, {})) for p in self.parts])

    def with_params(self, **params: Any) -> Policy:
        """``with_params(evit={"keep": 0.6})``: parameters per part, by reducer name."""
        unknown = [k for k in params if k not in self.params]
        if unknown:
            raise UserError(f"{self.name}: no part {unknown[0]!r}; parts: {', '.join(self.params)}")
        return self._rebuilt(params)

    def free_knob(self) -> Knob | None:
        """The first free knob by priority (a keep rate before ToMe's r), as the sweep takes it."""
        knobs = [k for k in (p.free_knob() for p in self.parts) if k is not None]
        return min(knobs, key=lambda k: k.priority) if knobs else None

    def with_knob(self, knob: Knob, value: Any) -> Policy:
        return self._rebuilt({p.name: {knob.param: value} for p in self.parts if p.free_knob() is knob})

    @property
    def needs_pos(self) -> bool:
        return any(p.needs_pos for p in self.parts)

    def importance(self, has_cls_token: bool) -> str | None:
        modes = sorted({m for m in (p.importance(has_cls_token) for p in self.parts) if m is not None})
        if len(modes) > 1:
            raise UserError(f"{self.name}: its parts rank tokens by {' and '.join(modes)} attention; the "
                            "evidence is read once per block, so give them the same importance=")
        return modes[0] if modes else None

    @property
    def prop_attn(self) -> bool:
        return any(p.prop_attn for p in self.parts)

    def observe(self, model: nn.Module) -> None:
        for p in self.parts:
            p.observe(model)

    def prepare(self, model: nn.Module) -> None:
        for p in self.parts:
            p.prepare(model)

    def bind(self, depth: int, n_tokens: int, n_prefix: int) -> None:
        super().bind(depth, n_tokens, n_prefix)
        for p in self.parts:
            p.bind(depth, n_tokens, n_prefix)

    def acts_at(self, layer: int) -> bool:
        return any(p.acts_at(layer) for p in self.parts)

    def tokens_after(self, layer: int, n: int, n_prefix: int) -> int:
        for p in self.parts:
            if p.acts_at(layer):
                n = p.tokens_after(layer, n, n_prefix)
        return n

    def reduce(self, layer: int, x: Tensor, ev: Evidence, st: TokenState) -> Tensor:
        acting = [p for p in self.parts if p.acts_at(layer)]
        for i, p in enumerate(acting):
            if i == len(acting) - 1:
                return p.reduce(layer, x, ev, st)
            tracked = _Reindexing(st, ev)
            x = p.reduce(layer, x, ev, tracked)  # type: ignore[arg-type]
            ev = tracked.ev
        return x


def combine(parts: list[Policy]) -> Policy:
    """The combiner installed in spec.parse_spec."""
    return Combination(parts)


set_combiner(combine)
