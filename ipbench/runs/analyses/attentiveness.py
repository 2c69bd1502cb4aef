"""`ipbench attentiveness`: do inattentive tokens become attentive after re-tokenization? (paper Table 5)

In each block where a reducer merges, take the tokens that are inattentive there (outside the
top-ρ fraction by the block's CLS attention, ρ = --attentive, by default the reducer's keep
rate) and follow their patches into the next block: the share whose token is attentive there.
Population ``merged`` (default) counts the inattentive tokens that took part in a merge (those
that were re-tokenized); ``inattentive`` counts all inattentive tokens. The paper counts layers
from 1: its layer 2 is block 1 here.

What ranks a token ([choice] ``--score``, default ``patch``): the CLS attention it draws divided by
the patches it holds. With proportional attention a merged token of s patches enters the softmax
with +log(s), so it draws about s times a single patch's attention for its size alone; ranked by
the raw attention (``token``) 89 % of ImagePiece's merged inattentive tokens on DeiT-Tiny "become
attentive" (200 shared images), which measures that boost, not the paper's claim that the merged
content means more. ``patch`` removes exactly the boost (the forward is unchanged) and gives 20-42 %
per block on the 1000 shared images, the paper's range (28-59 %); ``token`` stays available and
keeps its older rows' keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ipbench.errors import UserError
from ipbench.reducers import KEEP_RATE, Policy, parse_spec
from ipbench.reducers.trace import SCORES, Share, Trace, entries, inattentive_to_attentive
from ipbench.results import ATTENTIVENESS_COLUMNS, cell
from ipbench.runs.analyses import common
from ipbench.runs.context import RunSpec
from ipbench.runs.loop import Forward
from ipbench.runs.plan import Config
from ipbench.runs.progress import Progress

DEFAULT_REDUCERS = "imagepiece,tome:r=13,mstm"
DEFAULT_RATE = 0.7  # for reducers without a keep rate (ToMe)
POPULATIONS = ("merged", "inattentive")
DEFAULT_SCORE = "patch"  # [choice] see the module docstring: the paper counts content, not the size boost


def attentive_rate(policy: Policy | str, given: float | None) -> float:
    """ρ of "attentive": the option if given, else the reducer's keep rate, else 0.7."""
    if given is not None:
        return given
    policy = parse_spec(policy) if isinstance(policy, str) else policy
    for part in policy.parts:
        if type(part).knob is KEEP_RATE:
            return float(part.params[KEEP_RATE.param])
    return DEFAULT_RATE


class Attentiveness(common.Analysis):
    merged = ("shares",)
    command = "attentiveness"

    def __init__(self, run: common.AnalysisRun, policy: Policy, rate: float | None, population: str,
                 score: str = DEFAULT_SCORE) -> None:
        super().__init__(run, policy)
        self.rate = attentive_rate(policy, rate)
        self.population = population
        self.score = score
        self.shares: dict[Any, Share] = {}

    def skip_reason(self, probe: Trace) -> str | None:
        depth = len(self.run.net.blocks)
        found = [e for e in entries(probe, "merge") if e["src"].shape[1] > 0 and e["layer"] + 1 < depth]
        if not found:
            return "merges no tokens (pruning only), so nothing is re-tokenized"
        self.layers = sorted({e["layer"] for e in found})
        return None

    def _key(self, layer: Any) -> str:
        extra = {} if self.score == "token" else {"score": self.score}  # old keys stay valid for 'token'
        return self.key(layer=layer, attentive_rate=self.rate, population=self.population, **extra)

    def row_keys(self) -> list[str]:
        return [self._key(layer) for layer in [*self.layers, "all"]]

    def add(self, out: Forward) -> None:
        assert out.trace is not None
        for layer, share in inattentive_to_attentive(out.trace, self.rate, self.population, policy=None,
                                                         score=self.score).items():
            self.shares[layer] = self.shares.get(layer, Share()) + share
            self.shares["all"] = self.shares.get("all", Share()) + share

    def rows(self, cfg: Config) -> list[dict[str, Any]]:
        layers = sorted(k for k in self.shares if k != "all")
        return [{
            **self.run.row_fields(cfg, self._key(layer)),
            "layer": layer, "attentive_rate": self.rate, "population": self.population, "score": self.score,
            "share_became_attentive": cell(self.shares.get(layer, Share()).value, 5),
            "n_became_attentive": self.shares.get(layer, Share()).hits,
            "n_inattentive": self.shares.get(layer, Share()).total,
        } for layer in [*layers, "all"]]


def run(spec: RunSpec, out: Path, policies: list[Policy], rate: float | None, population: str,
        force: bool = False, progress: Progress | None = None, score: str = DEFAULT_SCORE) -> common.Outcome:
    check_options(rate, population, score)
    return common.run_traced(spec, out, "attentiveness", ATTENTIVENESS_COLUMNS, policies, force,
                             lambda run, policy: Attentiveness(run, policy, rate, population, score), progress)


def check_options(rate: float | None, population: str, score: str = DEFAULT_SCORE) -> None:
    """Validate --attentive, --population and --score before anything loads."""
    if rate is not None and not 0.0 < rate < 1.0:
        raise UserError(f"--attentive must be a fraction in (0, 1), got {rate:g}")
    if population not in POPULATIONS:
        raise UserError(f"unknown --population {population!r}; valid: {', '.join(POPULATIONS)}")
    if score not in SCORES:
        raise UserError(f"unknown --score {score!r}; valid: {', '.join(SCORES)}")
