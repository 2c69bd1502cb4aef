"""How a sweep drives a reducer: the one parameter a keep rate or a GMACs budget sets.

A policy declares its knob (``Policy.knob``); the sweep never looks at a reducer's name. Three kinds
cover the field's reducers:

* `KeepRate` (``keep`` in (0, 1]: EViT, Top-K, ImagePiece, MSTM, ...): a keep rate ρ is set as
  it is; a budget is met by bisection on ρ (GMACs grow with ρ, a step function of it).
* `CostMatched` (a parameter that is not a keep rate: PiToMe's ratio, PPT's r, DiffRate's target):
  a keep rate ρ becomes the candidate value whose GMACs are closest to a reference reducer's at ρ
  (EViT's default schedule); a budget the candidate closest to it.
* `MergeCount` (ToMe's ``r``, tokens merged per block): a `CostMatched` over the constant r; a
  budget is met by a constant r, or else by r+1 in the first j blocks and r after (one step of a
  constant r moves DeiT's cost by ~4 %, more than the tolerance).

Costs come from a `CostModel` the caller provides (the analytic count from the static token
plan: no image is run, so calibrating a whole sweep is instant; an image-adaptive reducer's from a
probe batch).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ipbench.errors import UserError

if TYPE_CHECKING:
    from ipbench.reducers.engine import TokenPlan
    from ipbench.reducers.policy import Policy

DEFAULT_TOLERANCE = 0.02  # --match-gmacs lands within 2 % of the budget
KEEP_FLOOR = 1e-4  # the lowest keep rate the bisection tries (one token per stage survives)


class CostModel(Protocol):
    """What a knob needs to know about the model: its size and the cost of a policy on it."""

    depth: int  # transformer blocks
    n_patches: int  # patch tokens entering block 0

    def gmacs(self, policy: Policy) -> float:
        """Analytic GMACs per image of `policy` (UserError if the policy does not fit the model)."""

    def plan(self, policy: Policy) -> TokenPlan:
        """The static token plan of `policy`."""


class Knob:
    """A reducer's sweep parameter: how a keep rate and a GMACs budget set it."""

    name = ""  # how rows and messages call this kind of knob
    param = ""  # the reducer parameter it sets
    priority = 0  # in a combination, the free knob of lowest priority value is the one swept

    def at_keep(self, policy: Policy, keep: float, costs: CostModel) -> Policy:
        """`policy` with the knob set for keep rate `keep`."""
        raise NotImplementedError

    def calibrate(self, policy: Policy, budget: float, costs: CostModel, tol: float = DEFAULT_TOLERANCE) -> Policy:
        """`policy` with the knob set so that its analytic GMACs are within `tol` of `budget`."""
        raise NotImplementedError

    def format(self, value: Any) -> str:
        """The knob's value as a short label shows it."""
        from ipbench.reducers.policy import format_value

        return format_value(value)

    def value_text(self, policy: Policy) -> str:
        """``keep=0.7`` / ``r=13``: the knob's value in `policy` (the first part that has it)."""
        for part in policy.parts:
            if type(part).knob is self and self.param in part.params:
                return f"{self.param}={self.format(part.params[self.param])}"
        return policy.spec


def _off(asked: Policy, best: Policy, budget: float, gmacs: float, where: str, tol: float, knob: Knob) -> UserError:
    """The budget is out of reach: say how close `best` (the closest `asked` can get) comes."""
    off = 100 * abs(gmacs - budget) / budget
    return UserError(f"--match-gmacs {budget:g}: {asked.text} cannot get within {100 * tol:g} % of "
                     f"{budget:g} GMACs ({where}); the closest reachable is {gmacs:.4f} GMACs "
                     f"({best.spec.split(':', 1)[0]} {knob.value_text(best)}, {off:.1f} % off)")


class KeepRate(Knob):
    name = "keep"
    param = "keep"
    priority = 0

    def at_keep(self, policy: Policy, keep: float, costs: CostModel) -> Policy:
        return policy.with_knob(self, keep)

    def _short(self, policy: Policy, keep: float, found: Policy, costs: CostModel, up: bool) -> Policy:
        """A short keep value with the same plan (a long one from bisection reads badly in a table)."""
        plan = costs.plan(found)
        for digits in (2, 3, 4, 5):
            f = 10 ** digits
            nice = (math.ceil if up else math.floor)(keep * f) / f
            if 0 < nice <= 1:
                p = policy.with_knob(self, nice)
                other = costs.plan(p)
                if other.mlp_tokens == plan.mlp_tokens and other.attn_tokens == plan.attn_tokens:
                    return p
        return found

    def calibrate(self, policy: Policy, budget: float, costs: CostModel, tol: float = DEFAULT_TOLERANCE) -> Policy:
        lo, hi = KEEP_FLOOR, 1.0
        p_lo, p_hi = policy.with_knob(self, lo), policy.with_knob(self, hi)
        g_lo, g_hi = costs.gmacs(p_lo), costs.gmacs(p_hi)
        if budget <= g_lo:
            if (g_lo - budget) / budget <= tol:
                return p_lo
            raise _off(policy, p_lo, budget, g_lo, "its lowest cost", tol, self)
        if budget >= g_hi:
            if (budget - g_hi) / budget <= tol:
                return p_hi
            raise _off(policy, p_hi, budget, g_hi, "above its cost at keep=1", tol, self)
        while hi - lo > 1e-6:
            mid = (lo + hi) / 2
            p_mid = policy.with_knob(self, mid)
            if costs.gmacs(p_mid) >= budget:
                hi, p_hi = mid, p_mid
            else:
                lo, p_lo = mid, p_mid
        best = min((self._short(policy, hi, p_hi, costs, up=True), self._short(policy, lo, p_lo, costs, up=False)),
                   key=lambda p: abs(costs.gmacs(p) - budget))
        if abs(costs.gmacs(best) - budget) / budget > tol:
            raise _off(policy, best, budget, costs.gmacs(best),
                       "its cost jumps over the budget between two keep rates", tol, self)
        return best


class CostMatched(Knob):
    """A parameter that is not a keep rate (PiToMe's per-block ratio, PPT's tokens per stage, a
    published schedule): a keep rate ρ sets the value whose GMACs are closest to a reference
    reducer's at ρ (EViT's default schedule, as for ToMe's r), and a budget the value closest to
    it. The candidates are a fixed grid of values (`values`), so both are a search, not a guess.
    """

    name = "cost_matched"
    priority = 1

    def __init__(self, param: str, values: Callable[[CostModel], Sequence[Any]], reference: str = "evit") -> None:
        self.param = param
        self.values = values
        self.reference = reference

    def _options(self, policy: Policy, costs: CostModel) -> list[tuple[Policy, float]]:
        """Every candidate this model can take, with its GMACs (the first error if it takes none)."""
        out, errors = [], []
        for v in self.values(costs):
            try:
                p = policy.with_knob(self, v)
                out.append((p, costs.gmacs(p)))
            except UserError as exc:  # a value this model cannot take
                errors.append(exc)
        if not out:
            raise errors[0] if errors else UserError(f"{policy.text}: no value of {self.param} to try")
        return out

    def at_keep(self, policy: Policy, keep: float, costs: CostModel) -> Policy:
        from ipbench.reducers.spec import parse_spec

        target = costs.gmacs(parse_spec(f"{self.reference}:keep={keep:g}"))
        return min(self._options(policy, costs), key=lambda pg: abs(pg[1] - target))[0]

    def calibrate(self, policy: Policy, budget: float, costs: CostModel, tol: float = DEFAULT_TOLERANCE) -> Policy:
        found, gm = min(self._options(policy, costs), key=lambda pg: abs(pg[1] - budget))
        if abs(gm - budget) / budget > tol:
            raise _off(policy, found, budget, gm, "the nearest of its values", tol, self)
        return found


class MergeCount(CostMatched):
    """Tokens merged per block (one value, or one per block), bounded by half of the patches."""

    name = "merge_count"
    priority = 1

    def __init__(self, param: str, reference: str) -> None:
        # a keep rate sets the r whose GMACs match `reference`'s (its default schedule) at it
        super().__init__(param, lambda costs: range(self.max_value(costs) + 1), reference)

    def max_value(self, costs: CostModel) -> int:
        """The largest constant r: half of the patch tokens."""
        return costs.n_patches // 2

    def format(self, value: Any) -> str:
        """13 for a constant r, 14x4/13x8 for a per-block schedule."""
        if isinstance(value, list | tuple) and value and len(set(value)) == 1:
            return str(value[0])
        if isinstance(value, list | tuple) and value:
            return "/".join(f"{v}x{len(list(g))}" for v, g in itertools.groupby(value))
        return super().format(value)

    def check_values(self, values: Sequence[int], costs: CostModel) -> None:
        """Values given on the command line (--tome-r) must fit the model."""
        if values and max(values) > self.max_value(costs):
            raise UserError(f"bad --tome-r value {max(values)}: ToMe merges at most half of the {costs.n_patches} "
                            f"patch tokens per block, r <= {self.max_value(costs)}")

    def calibrate(self, policy: Policy, budget: float, costs: CostModel, tol: float = DEFAULT_TOLERANCE) -> Policy:
        constant = [policy.with_knob(self, r) for r in range(self.max_value(costs) + 1)]
        cost = [costs.gmacs(p) for p in constant]
        best = min(range(len(constant)), key=lambda i: abs(cost[i] - budget))
        if budget > cost[0] and (budget - cost[0]) / budget > tol:
            raise _off(policy, constant[0], budget, cost[0], "above its cost at r=0", tol, self)
        if abs(cost[best] - budget) / budget <= tol / 2:
            return constant[best]
        r = max((i for i, c in enumerate(cost) if c >= budget), default=0)
        mixed = [(constant[best], cost[best])]
        for j in range(1, costs.depth):
            if r + 1 < len(constant):
                try:
                    p = policy.with_knob(self, [r + 1] * j + [r] * (costs.depth - j))
                    mixed.append((p, costs.gmacs(p)))
                except UserError:
                    break
        found, gm = min(mixed, key=lambda pg: abs(pg[1] - budget))
        if abs(gm - budget) / budget > tol:
            where = "its lowest cost" if budget < cost[-1] else "between two schedules"
            raise _off(policy, found, budget, gm, where, tol, self)
        return found


KEEP_RATE = KeepRate()


def ratio_grid(lo: float, step: float = 0.0025) -> Callable[[CostModel], list[float]]:
    """Per-block keep ratios lo, lo+step, ..., 1 (rounded, so a spec shows 0.9125, not 0.91250001)."""
    count = round((1.0 - lo) / step)
    return lambda costs: [round(lo + i * step, 6) for i in range(count + 1)]
