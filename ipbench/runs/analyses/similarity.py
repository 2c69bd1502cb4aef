"""`ipbench similarity`: how similar are the tokens a reducer merges? (paper Tables 6 and 8)

For every merged pair (src → dst) of every block, the cosine similarity on the features the
reducer matched on (``metric``: head-mean keys for ToMe/ImagePiece/MSTM by default) and on the
hidden states (``hidden``); averaged per block over all pairs of all images, and over all blocks
(row ``layer=all``). A reducer that only prunes has no pairs: a note, no rows. ImagePiece with
``retok=prune`` has the pairs that WOULD have merged (``pairs=pruned``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from ipbench.measure.exact import ExactSum
from ipbench.reducers import Policy
from ipbench.reducers.trace import Trace, entries, merged_pair_similarity
from ipbench.results import SIMILARITY_COLUMNS, cell
from ipbench.runs.analyses import common
from ipbench.runs.context import RunSpec
from ipbench.runs.loop import Forward
from ipbench.runs.plan import Config
from ipbench.runs.progress import Progress

DEFAULT_REDUCERS = "tome:r=13,imagepiece,mstm"
FEATURES = {"metric": "metric", "hidden": "x"}  # CSV name -> trace name


def merge_op(trace: Trace) -> str | None:
    """'merge' if the trace has merged pairs, 'prune' if only pruned pairs (retok=prune), else None."""
    for op in ("merge", "prune"):
        if any(e["src"].shape[1] > 0 for e in entries(trace, op)):
            return op
    return None


class Moments:
    """Sum, sum of squares and count of cosines, exact (`ExactSum`): any split of the images into
    batches or torchrun shards gives the same mean and std."""

    def __init__(self) -> None:
        self.s, self.ss = ExactSum(), ExactSum()
        self.n = 0

    def add(self, v: Tensor) -> None:
        v = v.double()  # float32 cosines: their float64 squares are exact
        self.s.extend(v.flatten().tolist())
        self.ss.extend((v * v).flatten().tolist())
        self.n += v.numel()

    def __add__(self, other: Moments) -> Moments:
        out = Moments()
        out.s, out.ss, out.n = self.s + other.s, self.ss + other.ss, self.n + other.n
        return out

    @property
    def mean(self) -> float:
        return self.s.value / self.n if self.n else float("nan")

    @property
    def std(self) -> float:
        if not self.n:
            return float("nan")
        return max(0.0, self.ss.value / self.n - self.mean ** 2) ** 0.5


class Similarity(common.Analysis):
    command = "similarity"
    merged = ("sums",)

    def __init__(self, run: common.AnalysisRun, policy: Policy) -> None:
        super().__init__(run, policy)
        self.op = "merge"
        self.metric = ""
        self.sums: dict[tuple[Any, str], Moments] = {}

    def skip_reason(self, probe: Trace) -> str | None:
        op = merge_op(probe)
        if op is None:
            return "merges no tokens (pruning only), so there are no merged pairs"
        self.op = op
        found = [e for e in entries(probe, op) if e["src"].shape[1] > 0]
        self.layers = sorted({e["layer"] for e in found})
        self.metric = "/".join(dict.fromkeys(str(e.get("metric", "keys")) for e in found))
        return None

    def _key(self, layer: Any, features: str) -> str:
        return self.key(layer=layer, features=features, pairs=self.op)

    def row_keys(self) -> list[str]:
        return [self._key(layer, f) for f in FEATURES for layer in [*self.layers, "all"]]

    def add(self, out: Forward) -> None:
        assert out.trace is not None
        for feat, on in FEATURES.items():
            for layer, sims in merged_pair_similarity(out.trace, on, op=self.op).items():
                if sims.numel():
                    self.sums.setdefault((layer, feat), Moments()).add(sims)
                    self.sums.setdefault(("all", feat), Moments()).add(sims)

    def rows(self, cfg: Config) -> list[dict[str, Any]]:
        out = []
        layers = sorted({k[0] for k in self.sums if k[0] != "all"})
        for feat in FEATURES:
            for layer in [*layers, "all"]:
                acc = self.sums.get((layer, feat), Moments())
                out.append({
                    **self.run.row_fields(cfg, self._key(layer, feat)),
                    "layer": layer, "features": feat, "metric": self.metric if feat == "metric" else "x",
                    "pairs": "merged" if self.op == "merge" else "pruned",
                    "mean_cos": cell(acc.mean, 5), "std_cos": cell(acc.std, 5),
                    "n_pairs": acc.n,
                })
        # the pooled rows last: their presence marks the reducer as done
        return sorted(out, key=lambda r: r["layer"] == "all")


def run(spec: RunSpec, out: Path, policies: list[Policy], force: bool = False,
        progress: Progress | None = None) -> common.Outcome:
    return common.run_traced(spec, out, "similarity", SIMILARITY_COLUMNS, policies, force, Similarity, progress)
