"""Reducer parameters from a cost: keep rate → ToMe r, and any reducer → a GMACs budget.

Everything here is computed from the static token plan and the analytic GMACs count
(`ipbench.measure.flops.analytic_gmacs`): no image is run, a call costs well under a millisecond,
so calibrating a whole sweep is instant. The analytic count agrees with fvcore within 1 %.

A sweep item is a reducer spec as the user wrote it (``evit``, ``imagepiece:r=k/2``,
``imagepiece+tome``); its *knob* is the one parameter the sweep sets:

* ``keep``: every part with a ``keep`` parameter the user did not fix (evit, topk, imagepiece,
  mstm, ...) gets ``keep=ρ``;
* ``tome_r``: a ToMe whose ``r`` the user did not fix gets ``r``;
* ``fixed``: the user fixed everything (``tome:r=13``, ``evit:keep=0.6``): run once as given.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ipbench.errors import UserError
from ipbench.measure.flops import analytic_gmacs
from ipbench.reducers import REGISTRY, TokenPlan, parse_spec, token_plan
from ipbench.reducers.policy import Policy

DEFAULT_TOLERANCE = 0.02  # --match-gmacs lands within 2 % of the budget
KEEP_FLOOR = 1e-4  # the lowest keep rate the bisection tries (one token per stage survives)
REFERENCE_EVIT = "evit"  # ToMe's r for a keep rate is matched to EViT's default schedule

_INT = re.compile(r"[-+]?\d+")


@dataclass(frozen=True)
class Item:
    """One ``--reducers`` entry: the spec as written, and which parameter the sweep sets."""

    text: str
    name: str  # policy name ("evit", "imagepiece+tome")
    knob: str  # "keep", "tome_r" or "fixed"


@dataclass(frozen=True)
class Static:
    """What a spec costs, known without an image."""

    spec: str  # canonical spec
    policy: Policy
    plan: TokenPlan
    gmacs: float  # analytic GMACs per image


def split_specs(values: Sequence[str]) -> list[str]:
    """Split ``--reducers`` values into specs: ``tome,evit:keep=0.7,fuse=false,imagepiece``.

    Commas separate specs and also the parameters inside one, so a piece starts a new spec when it
    names a reducer (``evit``, ``evit:keep=0.7``, ``imagepiece+tome``) and continues the current
    one when it is a parameter (``fuse=false``) or a bare integer of a list (``layers=3,6,9``).
    """
    specs: list[str] = []
    for value in values:
        for piece in (p.strip() for p in value.split(",")):
            if not piece:
                raise UserError(f"empty item in --reducers {value!r}")
            key = piece.split("=", 1)[0]
            continues = ("=" in piece and ":" not in key) or (
                "=" not in piece and _INT.fullmatch(piece.split("+", 1)[0].strip()) is not None)
            if continues:
                if not specs:
                    raise UserError(f"--reducers {value!r}: {piece!r} comes before any reducer name")
                specs[-1] += "," + piece
            else:
                specs.append(piece)
    return specs


def _explicit_params(part: str) -> set[str]:
    _, _, rest = part.partition(":")
    return {p.split("=", 1)[0].strip() for p in rest.split(",") if "=" in p}


def _parts(text: str) -> list[tuple[str, str]]:
    """(reducer name, spec text) of each ``+`` part."""
    return [(p.partition(":")[0].strip().lower(), p.strip()) for p in text.split("+")]


def _has_param(name: str, param: str) -> bool:
    cls = REGISTRY.get(name)
    return cls is not None and any(p.name == param for p in cls.PARAMS)


def make_item(text: str) -> Item:
    """Validate a spec (one-line UserError if bad) and find the parameter the sweep sets."""
    policy = parse_spec(text)
    parts = _parts(text)
    if any(_has_param(n, "keep") and "keep" not in _explicit_params(s) for n, s in parts):
        knob = "keep"
    elif any(n == "tome" and "r" not in _explicit_params(s) for n, s in parts):
        knob = "tome_r"
    else:
        knob = "fixed"
    return Item(text=text.strip(), name=policy.name, knob=knob)


def _format_r(r: int | Sequence[int]) -> str:
    return str(r) if isinstance(r, int) else ",".join(str(v) for v in r)


def fill(item: Item, value: float | int | Sequence[int]) -> str:
    """The item's spec with its knob set: ``keep=ρ`` on every free keep part, or ToMe's ``r``."""
    out = []
    for name, part in _parts(item.text):
        free = _explicit_params(part)
        add = None
        if item.knob == "keep" and _has_param(name, "keep") and "keep" not in free:
            add = f"keep={float(value):g}"  # type: ignore[arg-type]
        elif item.knob == "tome_r" and name == "tome" and "r" not in free:
            add = f"r={_format_r(value)}"  # type: ignore[arg-type]
        if add is None:
            out.append(part)
        else:
            head, sep, rest = part.partition(":")
            out.append(f"{head}:{add}" + (f",{rest}" if sep and rest.strip() else ""))
    return "+".join(out)


def static(model: nn.Module, spec: str) -> Static:
    """Token plan and analytic GMACs of `spec` on a plain (unpatched) `model`."""
    policy = parse_spec(spec)
    plan = token_plan(model, policy)
    return Static(spec=policy.spec, policy=policy, plan=plan, gmacs=analytic_gmacs(model, plan))


def tome_r_max(model: nn.Module) -> int:
    """The largest constant r ToMe accepts: half of the patch tokens."""
    return (model.patch_embed.num_patches) // 2


def tome_r_for_keep(model: nn.Module, keep: float, item: Item | None = None) -> int:
    """The constant r whose GMACs are closest to EViT's (default schedule) at keep rate `keep`."""
    target = static(model, f"{REFERENCE_EVIT}:keep={keep:g}").gmacs
    item = item or make_item("tome")
    costs = {r: static(model, fill(item, r)).gmacs for r in range(tome_r_max(model) + 1)}
    return min(costs, key=lambda r: (abs(costs[r] - target), r))


@dataclass(frozen=True)
class Calibration:
    """The spec that meets a GMACs budget, and what it costs."""

    spec: str
    gmacs: float
    budget: float

    @property
    def error(self) -> float:
        return abs(self.gmacs - self.budget) / self.budget


def _fail(item: Item, budget: float, best: Static, where: str, tol: float) -> UserError:
    off = 100 * abs(best.gmacs - budget) / budget
    return UserError(f"--match-gmacs {budget:g}: {item.text} cannot get within {100 * tol:g} % of "
                     f"{budget:g} GMACs ({where}); the closest reachable is {best.gmacs:.4f} GMACs "
                     f"({best.spec.split(':', 1)[0]} {_knob_text(best)}, {off:.1f} % off)")


def _knob_text(s: Static) -> str:
    for part in getattr(s.policy, "parts", [s.policy]):
        keep = part.params.get("keep")
        if isinstance(keep, float):
            return f"keep={keep:g}"
        if part.name == "tome":
            return f"r={_format_r(part.params['r'])}"
    return s.spec


def _round_keep(model: nn.Module, item: Item, keep: float, plan: Static, up: bool) -> Static:
    """A short keep value with the same plan (a long one from bisection reads badly in a table)."""
    for digits in (2, 3, 4, 5):
        f = 10 ** digits
        nice = (math.ceil if up else math.floor)(keep * f) / f
        if 0 < nice <= 1:
            s = static(model, fill(item, nice))
            if s.plan.mlp_tokens == plan.plan.mlp_tokens and s.plan.attn_tokens == plan.plan.attn_tokens:
                return s
    return plan


def _calibrate_keep(model: nn.Module, item: Item, budget: float, tol: float) -> Static:
    """Bisection on keep ∈ (0, 1]: GMACs grow with the keep rate (a step function of it)."""
    lo, hi = KEEP_FLOOR, 1.0
    s_lo, s_hi = static(model, fill(item, lo)), static(model, fill(item, hi))
    if budget <= s_lo.gmacs:
        if (s_lo.gmacs - budget) / budget <= tol:
            return s_lo
        raise _fail(item, budget, s_lo, "its lowest cost", tol)
    if budget >= s_hi.gmacs:
        if (budget - s_hi.gmacs) / budget <= tol:
            return s_hi
        raise _fail(item, budget, s_hi, "above its cost at keep=1", tol)
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        s_mid = static(model, fill(item, mid))
        if s_mid.gmacs >= budget:
            hi, s_hi = mid, s_mid
        else:
            lo, s_lo = mid, s_mid
    best = min((_round_keep(model, item, hi, s_hi, up=True), _round_keep(model, item, lo, s_lo, up=False)),
               key=lambda s: abs(s.gmacs - budget))
    if abs(best.gmacs - budget) / budget > tol:
        raise _fail(item, budget, best, "its cost jumps over the budget between two keep rates", tol)
    return best


def _calibrate_tome(model: nn.Module, item: Item, budget: float, tol: float) -> Static:
    """Constant integer r if it lands within `tol`; else r+1 in the first j blocks and r after.

    One step of a constant r moves DeiT's cost by ~4 %, more than the tolerance; the mixed
    schedule (ToMe accepts one r per block) splits that step into depth finer ones.
    """
    constant = [static(model, fill(item, r)) for r in range(tome_r_max(model) + 1)]
    best = min(constant, key=lambda s: abs(s.gmacs - budget))
    if budget > constant[0].gmacs and (budget - constant[0].gmacs) / budget > tol:
        raise _fail(item, budget, constant[0], "above its cost at r=0", tol)
    if abs(best.gmacs - budget) / budget <= tol / 2:
        return best
    depth = len(model.blocks)
    r = max((i for i, s in enumerate(constant) if s.gmacs >= budget), default=0)
    mixed = [best]
    for j in range(1, depth):
        if r + 1 < len(constant):
            try:
                mixed.append(static(model, fill(item, [r + 1] * j + [r] * (depth - j))))
            except UserError:
                break
    best = min(mixed, key=lambda s: abs(s.gmacs - budget))
    if abs(best.gmacs - budget) / budget > tol:
        where = "its lowest cost" if budget < constant[-1].gmacs else "between two schedules"
        raise _fail(item, budget, best, where, tol)
    return best


def calibrate(model: nn.Module, item: Item, budget: float, tol: float = DEFAULT_TOLERANCE) -> Calibration:
    """The spec of `item` whose analytic GMACs are closest to `budget` (within `tol`, else UserError)."""
    if budget <= 0:
        raise UserError(f"--match-gmacs must be positive, got {budget:g}")
    if item.knob == "keep":
        s = _calibrate_keep(model, item, budget, tol)
    elif item.knob == "tome_r":
        s = _calibrate_tome(model, item, budget, tol)
    else:
        raise UserError(f"--match-gmacs: {item.text} fixes its parameters (keep= or tome's r=); "
                        "leave the one to calibrate out of the spec")
    return Calibration(spec=s.spec, gmacs=s.gmacs, budget=budget)
