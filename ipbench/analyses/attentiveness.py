"""`ipbench attentiveness`: do inattentive tokens become attentive after re-tokenization? (paper Table 5)

In each block where a reducer merges, take the tokens that are inattentive there (outside the
top-ρ fraction by the block's CLS attention, ρ = --attentive, by default the reducer's keep
rate) and follow their patches into the next block: the share whose token is attentive there.
Population ``merged`` (default) counts the inattentive tokens that took part in a merge (those
that were re-tokenized); ``inattentive`` counts all inattentive tokens. The paper counts layers
from 1: its layer 2 is block 1 here.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ipbench.analyses import common
from ipbench.errors import UserError
from ipbench.models import ReducerInfo
from ipbench.reducers import parse_spec
from ipbench.reducers.trace import Share, Trace, entries, inattentive_to_attentive
from ipbench.results import ATTENTIVENESS_COLUMNS

DEFAULT_REDUCERS = "imagepiece,tome:r=13,mstm"
DEFAULT_RATE = 0.7  # for reducers without a keep rate (ToMe)
POPULATIONS = ("merged", "inattentive")


def attentive_rate(spec: str, given: float | None) -> float:
    """ρ of "attentive": the option if given, else the reducer's keep rate, else 0.7."""
    if given is not None:
        return given
    for part in common.parts(parse_spec(spec)):
        if "keep" in part.params:
            return float(part.params["keep"])
    return DEFAULT_RATE


class Attentiveness(common.Analysis):
    command = "attentiveness"

    def __init__(self, setup: common.Setup, spec: str, rate: float | None, population: str) -> None:
        super().__init__(setup, spec)
        self.rate = attentive_rate(spec, rate)
        self.population = population
        self.shares: dict[Any, Share] = {}

    def skip_reason(self, probe: Trace) -> str | None:
        depth = len(self.setup.net.blocks)
        found = [e for e in entries(probe, "merge") if e["src"].shape[1] > 0 and e["layer"] + 1 < depth]
        if not found:
            return "merges no tokens (pruning only), so nothing is re-tokenized"
        self.layers = sorted({e["layer"] for e in found})
        return None

    def _key(self, layer: Any) -> str:
        return self.key(layer=layer, attentive_rate=self.rate, population=self.population)

    def row_keys(self) -> list[str]:
        return [self._key(layer) for layer in [*self.layers, "all"]]

    def add(self, trace: Trace, logits: Tensor, labels: Tensor) -> None:
        for layer, share in inattentive_to_attentive(trace, self.rate, self.population, policy=None).items():
            self.shares[layer] = self.shares.get(layer, Share()) + share
            self.shares["all"] = self.shares.get("all", Share()) + share

    def rows(self, info: ReducerInfo) -> list[dict[str, Any]]:
        layers = sorted(k for k in self.shares if k != "all")
        return [{
            **common.row_fields(self.setup, info, self._key(layer)),
            "layer": layer, "attentive_rate": self.rate, "population": self.population,
            "share_became_attentive": common.rounded(self.shares.get(layer, Share()).value, 5),
            "n_became_attentive": self.shares.get(layer, Share()).hits,
            "n_inattentive": self.shares.get(layer, Share()).total,
        } for layer in [*layers, "all"]]


def run(s: common.Settings, rate: float | None, population: str) -> common.Outcome:
    if rate is not None and not 0.0 < rate < 1.0:
        raise UserError(f"--attentive must be a fraction in (0, 1), got {rate:g}")
    if population not in POPULATIONS:
        raise UserError(f"unknown --population {population!r}; valid: {', '.join(POPULATIONS)}")
    return common.run_traced(s, "attentiveness", ATTENTIVENESS_COLUMNS, DEFAULT_REDUCERS,
                             lambda setup, spec: Attentiveness(setup, spec, rate, population))


def print_table(out: common.Outcome) -> None:
    """Paper Table 5's shape: one column per re-tokenize block, % that became attentive."""
    assert out.setup is not None
    layers = sorted({int(r["layer"]) for r in out.rows if str(r["layer"]) != "all"})
    population = out.rows[0]["population"] if out.rows else "merged"
    t = common.table(
        f"attentiveness: inattentive -> attentive in the next block, {out.setup.timm_name} (paper Table 5)",
        ["reducer", "ρ", *[f"block {layer}" for layer in layers], "all"],
        f"% of the inattentive tokens ({'that took part in a merge' if population == 'merged' else 'all'}) of a "
        "block whose patches are in an attentive token (top ρ by CLS attention) in the next block; "
        f"{len(out.setup.images)} images of {out.setup.source.path}; blocks 0-indexed (the paper's layer 2 is "
        "block 1).\n" + common.training_free_note(out.setup))
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for r in out.rows:
        groups.setdefault(r["reducer_spec"], {})[str(r["layer"])] = r
    def pct(c: dict[str, Any] | None) -> str:
        return "-" if c is None or c["share_became_attentive"] == "" else \
            f"{100 * float(c['share_became_attentive']):.2f}"

    for spec, cells in groups.items():
        rate = next(iter(cells.values()))["attentive_rate"]
        t.add_row(common.short_label(spec), f"{float(rate):g}", *[pct(cells.get(str(layer))) for layer in layers],
                  pct(cells.get("all")))
    common.console().print(t)
