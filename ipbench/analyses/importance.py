"""`ipbench importance`: are the tokens a reducer merges important ones? (paper Table 7)

Per block, the share of merged tokens that lie in the top-p % by that block's CLS attention, for
several p, beside the share tokens chosen at random would have (the top set's size over the
tokens, ≈ p). ToMe merges by similarity alone, so many of its merged tokens are attentive;
ImagePiece merges only the bottom-k, so its share inside its own semantic set (p = keep rate)
is 0 by construction. A reducer that only prunes has no merged tokens: a note, no rows.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ipbench.analyses import common
from ipbench.errors import UserError
from ipbench.models import ReducerInfo
from ipbench.reducers.trace import Share, Trace, entries, merged_top_share, top_count
from ipbench.results import IMPORTANCE_COLUMNS

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

    def __init__(self, setup: common.Setup, spec: str, top: list[float], tokens: str) -> None:
        super().__init__(setup, spec)
        self.top, self.tokens = top, tokens
        self.shares: dict[tuple[Any, float], Share] = {}
        self.expected: dict[tuple[Any, float], float] = {}

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

    def add(self, trace: Trace, logits: Tensor, labels: Tensor) -> None:
        for p in self.top:
            for layer, share, expected in step_shares(trace, p, self.tokens):
                for k in ((layer, p), ("all", p)):
                    self.shares[k] = self.shares.get(k, Share()) + share
                    self.expected[k] = self.expected.get(k, 0.0) + expected

    def rows(self, info: ReducerInfo) -> list[dict[str, Any]]:
        out = []
        layers = sorted({k[0] for k in self.shares if k[0] != "all"})
        for layer in [*layers, "all"]:
            for p in self.top:
                sh = self.shares.get((layer, p), Share())
                out.append({
                    **common.row_fields(self.setup, info, self._key(layer, p)),
                    "layer": layer, "top_p": p, "tokens": self.tokens,
                    "share": common.rounded(sh.value, 5),
                    "random_share": common.rounded(self.expected.get((layer, p), 0.0) / sh.total
                                                   if sh.total else None, 5),
                    "n_top": sh.hits, "n_merged": sh.total,
                })
        return out


def run(s: common.Settings, top: list[float], tokens: str) -> common.Outcome:
    if tokens not in TOKENS:
        raise UserError(f"unknown --tokens {tokens!r}; valid: {', '.join(TOKENS)}")
    return common.run_traced(s, "importance", IMPORTANCE_COLUMNS, DEFAULT_REDUCERS,
                             lambda setup, spec: Importance(setup, spec, top, tokens))


def print_table(out: common.Outcome) -> None:
    """Paper Table 7's shape: % of merged tokens in the top p % (first block, and all blocks)."""
    assert out.setup is not None
    tops = list(dict.fromkeys(float(r["top_p"]) for r in out.rows))
    tokens = out.rows[0]["tokens"] if out.rows else "src"
    t = common.table(
        f"importance: merged tokens among the most attended, {out.setup.timm_name} (paper Table 7)",
        ["reducer", "blocks", *[f"top {100 * p:g} %" for p in tops], "merged tokens"],
        f"% of the merged tokens ({'tokens merged away' if tokens == 'src' else 'both tokens of a pair'}) that lie "
        f"in the top p % by CLS attention of their block; in parentheses: the same for tokens chosen at random. "
        f"{len(out.setup.images)} images of {out.setup.source.path}; blocks 0-indexed.\n"
        + common.training_free_note(out.setup))
    groups: dict[str, dict[tuple[str, float], dict[str, Any]]] = {}
    for r in out.rows:
        groups.setdefault(r["reducer_spec"], {})[(str(r["layer"]), float(r["top_p"]))] = r
    for spec, cells in groups.items():
        layers = sorted({int(layer) for layer, _ in cells if layer != "all"})
        if not layers:
            continue
        for scope, name in ((str(layers[0]), f"first (block {layers[0]})"), ("all", "all")):
            row = [common.short_label(spec) if scope != "all" else "", name]
            for p in tops:
                c = cells.get((scope, p))
                row.append("-" if c is None or c["share"] == "" else
                           f"{100 * float(c['share']):.2f} ({100 * float(c['random_share']):.1f})")
            c0 = cells.get((scope, tops[0]))
            row.append(str(c0["n_merged"]) if c0 else "-")
            t.add_row(*row)
    common.console().print(t)
