"""`ipbench importance`: are the tokens a reducer merges important ones? (paper Table 7)

Per block, the share of merged tokens that lie in the top-p % by that block's CLS attention, for
several p, beside the share tokens chosen at random would have (the top set's size over the
tokens, ≈ p). ToMe merges by similarity alone, so many of its merged tokens are attentive;
ImagePiece merges only the bottom-k, so its share inside its own semantic set (p = keep rate)
is 0 by construction. A reducer that only prunes has no merged tokens: a note, no rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ipbench.errors import UserError
from ipbench.measure.exact import ExactSum
from ipbench.reducers import Policy
from ipbench.reducers.trace import Share, Trace, entries, merged_top_share, top_count
from ipbench.results import IMPORTANCE_COLUMNS, cell
from ipbench.runs.analyses import common
from ipbench.runs.context import RunSpec
from ipbench.runs.loop import Forward
from ipbench.runs.plan import Config
from ipbench.runs.progress import Progress

DEFAULT_REDUCERS = "tome:r=13,imagepiece,mstm"
DEFAULT_TOP = "30,20,15,70"  # the paper's Table 7 columns
TOKENS = ("src", "both")


def parse_top(text: str) -> list[float]:
    """``--top 30,20,15,70`` (percent) → [0.3, 0.2, 0.15, 0.7]."""
    values = common.parse_floats(text, "--top")
    bad = [v for v in values if not 1.0 <= v <= 100.0]
    if bad:
        raise UserError(f"--top takes percentages in [1, 100] (30 = the top 30 %), got {bad[0]:g}")
    return [round(v / 100.0, 6) for v in values]


def random_share(entry: dict[str, Any], p: float) -> float:
    """The share of tokens chosen uniformly at random that lies in the top-p set of this step:
    the top set's size over the step's non-prefix tokens (p up to rounding)."""
    m = entry["n_in"] - entry["n_prefix"]
    return top_count(p, m) / m if m else float("nan")


def step_shares(trace: Trace, p: float, tokens: str = "src") -> list[tuple[int, Share, float]]:
    """Per merge step: (block, Share of merged tokens in the top-p, expected hits at random)."""
    out = []
    for e in entries(trace, "merge"):
        share = merged_top_share([e], p, tokens).get(e["layer"], Share())
        out.append((e["layer"], share, share.total * random_share(e, p)))
    return out


class Importance(common.Analysis):
    command = "importance"
    merged = ("shares", "expected")

    def __init__(self, run: common.AnalysisRun, policy: Policy, top: list[float], tokens: str) -> None:
        super().__init__(run, policy)
        self.top, self.tokens = top, tokens
        self.shares: dict[tuple[Any, float], Share] = {}
        self.expected: dict[tuple[Any, float], ExactSum] = {}

    def skip_reason(self, probe: Trace) -> str | None:
        found = [e for e in entries(probe, "merge") if e["src"].shape[1] > 0]
        if not found:
            return "merges no tokens (pruning only), so there are no merged tokens to rank"
        self.layers = sorted({e["layer"] for e in found})
        return None

    def _key(self, layer: Any, p: float) -> str:
        return self.key(layer=layer, top_p=p, tokens=self.tokens)

    def row_keys(self) -> list[str]:
        return [self._key(layer, p) for p in self.top for layer in [*self.layers, "all"]]

    def add(self, out: Forward) -> None:
        assert out.trace is not None
        for p in self.top:
            for layer, share, expected in step_shares(out.trace, p, self.tokens):
                for k in ((layer, p), ("all", p)):
                    self.shares[k] = self.shares.get(k, Share()) + share
                    self.expected.setdefault(k, ExactSum()).extend([expected])

    def rows(self, cfg: Config) -> list[dict[str, Any]]:
        out = []
        layers = sorted({k[0] for k in self.shares if k[0] != "all"})
        for layer in [*layers, "all"]:
            for p in self.top:
                sh = self.shares.get((layer, p), Share())
                out.append({
                    **self.run.row_fields(cfg, self._key(layer, p)),
                    "layer": layer, "top_p": p, "tokens": self.tokens,
                    "share": cell(sh.value, 5),
                    "random_share": cell(self.expected.get((layer, p), ExactSum()).value / sh.total
                                                   if sh.total else None, 5),
                    "n_top": sh.hits, "n_merged": sh.total,
                })
        return out


def run(spec: RunSpec, out: Path, policies: list[Policy], top: list[float], tokens: str, force: bool = False,
        progress: Progress | None = None) -> common.Outcome:
    if tokens not in TOKENS:
        raise UserError(f"unknown --tokens {tokens!r}; valid: {', '.join(TOKENS)}")
    return common.run_traced(spec, out, "importance", IMPORTANCE_COLUMNS, policies, force,
                             lambda run, policy: Importance(run, policy, top, tokens), progress)
