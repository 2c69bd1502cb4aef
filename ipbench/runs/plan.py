"""Configurations: policies with their static cost, the sweep's plan, and the models they run in.

Everything here is known without an image: the static token plan and the analytic GMACs
(`ipbench.measure.flops.analytic_gmacs`, within 1 % of fvcore) of every configuration, so a whole
sweep, its keep-rate mapping and its --match-gmacs calibration are planned in milliseconds (but for a
reducer whose counts depend on the image, ATS: its cost is measured on a probe batch). Which
parameter a keep rate or a budget sets is the policy's own declaration (`Policy.knob`).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from ipbench.errors import UserError
from ipbench.measure.flops import analytic_gmacs
from ipbench.reducers import (
    Policy,
    TokenPlan,
    apply_reducer,
    check_fits,
    parse_spec,
    reducible,
    remove_reducer,
    token_plan,
)
from ipbench.reducers.knobs import DEFAULT_TOLERANCE, KEEP_RATE, Knob, MergeCount

BASELINE = "none"
DEFAULT_KEEP_RATES = (0.9, 0.8, 0.7, 0.6, 0.5)


def per_image_gmacs(model: nn.Module, n_in: int, counts: list[int]) -> float:
    """Analytic GMACs of one image from its measured token counts after each block (a reducer that
    cuts inside a block, between attention and MLP, as every ipbench policy does)."""
    plan = SimpleNamespace(attn_tokens=[n_in, *counts[:-1]], mlp_tokens=list(counts))
    return analytic_gmacs(model, plan)


def mean_gmacs(model: nn.Module, n_in: int, rows: list[list[int]]) -> float:
    """The mean of the images' analytic GMACs from their counts (`per_image_gmacs`), each distinct
    count vector counted once."""
    cache: dict[tuple[int, ...], float] = {}
    for r in rows:
        if tuple(r) not in cache:
            cache[tuple(r)] = per_image_gmacs(model, n_in, r)
    return sum(cache[tuple(r)] for r in rows) / len(rows)


class Costs:
    """The cost of policies on one plain model (the reducers' `CostModel`), memoised by spec: from the
    static token plan, or for an image-adaptive policy (ATS) the mean over the `probe` images (a
    normalised batch) of each image's analytic GMACs from its measured counts."""

    def __init__(self, model: nn.Module, probe: Tensor | None = None) -> None:
        self.model = model
        self.depth = len(model.blocks)
        self.n_patches = int(model.patch_embed.num_patches)
        self.probe = probe
        self._gmacs: dict[str, float] = {}

    def plan(self, policy: Policy) -> TokenPlan:
        if policy.name != BASELINE:
            check_fits(self.model, policy)
        return token_plan(self.model, policy)

    def gmacs(self, policy: Policy) -> float:
        if policy.spec not in self._gmacs:
            if policy.adaptive and self.probe is not None:
                self._gmacs[policy.spec] = self._probed(policy)
            else:
                self._gmacs[policy.spec] = analytic_gmacs(self.model, self.plan(policy))
        return self._gmacs[policy.spec]

    def _probed(self, policy: Policy) -> float:
        """Mean analytic GMACs of the probe images under `policy`, from their measured counts."""
        n_in = self.plan(policy).n_in
        apply_reducer(self.model, policy)
        try:
            with torch.inference_mode():
                self.model(self.probe)
            rows = self.model._ipb.last_image_counts
        finally:
            remove_reducer(self.model)
        if rows is None:  # every image kept the same counts: the static plan is exact
            return analytic_gmacs(self.model, self.plan(policy))
        return mean_gmacs(self.model, n_in, rows.tolist())


def require_reducible(name: str, model: nn.Module, why: str) -> None:
    """A one-line UserError for a command that measures token reducers on a model they cannot run on."""
    if not reducible(model):
        raise UserError(f"{name} is a {type(model).__name__}, not a ViT family ipbench reduces "
                        f"(timm VisionTransformer, Eva, Beit): {why} (use ipbench eval for this model's accuracy)")


@dataclass
class Config:
    """One configuration of a command: a policy, what it costs, and what it stands for in a sweep."""

    policy: Policy
    plan: TokenPlan | None  # None for a model token reduction does not apply to
    gmacs: float | None  # analytic GMACs per image
    keep_rate: float | None = None  # the sweep's nominal keep rate
    gmacs_budget: float | None = None  # the --match-gmacs budget
    key: str = ""

    @property
    def spec(self) -> str:
        return self.policy.spec

    @property
    def label(self) -> str:
        return self.policy.label()

    def fields(self) -> dict[str, Any]:
        """What every row says about the reducer."""
        p = self.policy
        # an image-adaptive policy's static plan is only each image's upper bound: its counts are
        # measured (sweep and eval fill them in), never shown from the plan
        tokens = self.plan.after if self.plan is not None and not p.adaptive else []
        return {
            "reducer": p.name, "reducer_spec": p.spec, "reducer_params": p.params_json(),
            "reducer_label": p.label(), "reducer_line": p.label(drop_knob=True),
            "training_free": bool(p.training_free), "tokens_per_layer": " ".join(map(str, tokens)),
            "final_tokens": tokens[-1] if tokens else "",
        }


def config(model: nn.Module, policy: Policy | str, costs: Costs | None = None, **kw: Any) -> Config:
    """A Config of `policy` on `model` (costs from `costs` when given; no analytic GMACs for a patch
    embedding the count does not know)."""
    policy = parse_spec(policy) if isinstance(policy, str) else policy
    if not reducible(model):
        if policy.name != BASELINE:
            check_fits(model, policy)  # the one-line error that names what a reducer needs
        return Config(policy=policy, plan=None, gmacs=None, **kw)
    costs = costs or Costs(model)
    try:
        gmacs: float | None = costs.gmacs(policy)
    except ValueError:  # a patch embedding the analytic count does not know (ImagePiece's conv stem)
        gmacs = None
    return Config(policy=policy, plan=costs.plan(policy), gmacs=gmacs, **kw)


def keep_of(policy: Policy) -> float | None:
    """The keep rate a fixed spec gives itself (its first part whose knob is a keep rate), else None."""
    return next((p.params["keep"] for p in policy.parts if type(p).knob is KEEP_RATE), None)


def calibrate(costs: Costs, policy: Policy, budget: float, tol: float = DEFAULT_TOLERANCE) -> Policy:
    """`policy` with its free knob set so that its analytic GMACs are within `tol` of `budget`."""
    if budget <= 0:
        raise UserError(f"--match-gmacs must be positive, got {budget:g}")
    knob = policy.free_knob()
    if knob is None:
        raise UserError(f"--match-gmacs: {policy.text} fixes its parameters (keep= or tome's r=); "
                        "leave the one to calibrate out of the spec")
    return knob.calibrate(policy, budget, costs, tol)


def plan_sweep(costs: Costs, policies: list[Policy], keep_rates: list[float] | None = None,
               knob_values: list[int] | None = None, budgets: list[float] | None = None) -> list[Config]:
    """The sweep's configurations, the baseline first, from the static plan only (no image runs).

    Keep rates: each policy's free knob is set for every rate (a keep rate as it is; ToMe's r
    matched to EViT's GMACs), unless `knob_values` gives ToMe's r values directly (--tome-r).
    Budgets: every policy's knob is calibrated to each budget. Policies whose knob the spec fixed
    run once as given.
    """
    configs = [config(costs.model, BASELINE, costs)]

    def add(policy: Policy, keep: float | None = None, budget: float | None = None) -> None:
        configs.append(config(costs.model, policy, costs, keep_rate=keep, gmacs_budget=budget))

    fixed = [p for p in policies if p.free_knob() is None]
    if budgets:
        if fixed:
            raise UserError(f"--match-gmacs: {fixed[0].text} fixes its parameters (keep= or tome's r=); "
                            "leave the one to calibrate out of the spec")
        for budget in budgets:
            for p in policies:
                add(calibrate(costs, p, budget), budget=budget)
        return _unique(configs)
    by_value = [p for p in policies if knob_values and _takes_values(p.free_knob())]
    if knob_values and not by_value:
        raise UserError("--tome-r sets ToMe's r, but --reducers has no tome whose r is free")
    for p in by_value:
        p.free_knob().check_values(knob_values, costs)  # type: ignore[union-attr]
    for keep in keep_rates or DEFAULT_KEEP_RATES:
        for p in policies:
            knob = p.free_knob()
            if knob is not None and p not in by_value:
                add(knob.at_keep(p, keep, costs), keep=keep)
    for p in by_value:
        for value in knob_values or []:
            add(p.with_knob(p.free_knob(), value))  # type: ignore[arg-type]
    for p in fixed:
        add(p, keep=keep_of(p))
    return _unique(configs)


def _takes_values(knob: Knob | None) -> bool:
    """Whether --tome-r can set this knob (a merge count, ToMe's r)."""
    return isinstance(knob, MergeCount)


def _unique(configs: list[Config]) -> list[Config]:
    seen: set[tuple[str, float | None, float | None]] = set()
    out = []
    for c in configs:
        ident = (c.spec, c.keep_rate, c.gmacs_budget)
        if ident not in seen:
            seen.add(ident)
            out.append(c)
    return out


@dataclass
class Variants:
    """The models a command runs: the ONE loaded model for the baseline, weight-sharing patched copies
    for every other configuration (patching is a class swap, so each needs its own module tree, but
    never its own weights: K configurations of DeiT-B cost K·(a few KiB), not K·344 MB)."""

    net: nn.Module
    tracing: bool = False
    _made: dict[str, nn.Module] = field(default_factory=dict)

    def __call__(self, policy: Policy) -> nn.Module:
        if policy.name == BASELINE and not self.tracing:
            return self.net
        if policy.spec not in self._made:
            memo: dict[int, Any] = {id(t): t for t in itertools.chain(self.net.parameters(), self.net.buffers())}
            clone = copy.deepcopy(self.net, memo)
            self._made[policy.spec] = apply_reducer(clone, policy, tracing=self.tracing)
        return self._made[policy.spec]


def variant(net: nn.Module, policy: Policy | str, tracing: bool = False) -> nn.Module:
    """`net` itself for the baseline (plain timm), else a weight-sharing copy patched with `policy`."""
    return Variants(net, tracing)(parse_spec(policy) if isinstance(policy, str) else policy)
