"""The reference runs whose numbers the tests pin, and how their numbers are read from the CSVs.

Each case is one or more ipbench commands run in-process through the command line (the user's
entry point, so a case means the same before and after any refactoring), on the shared weights
and images. `benchmarks/record_reference.py` runs every case once and writes what it read to
`tests/reference/<case>.json`; the tests run the same cases again and compare, number for number.

Counts (correct@1, correct@5, tokens, mask counts, pair counts) must be equal; fvcore/analytic
GMACs to 1e-4 (the CSV's rounding); similarities and shares to 1e-6 (the CSV keeps 5 digits, so
equality of the printed value).
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"

# Every configuration of the README's two accuracy tables (results, and reducers against the official
# code), as fixed specs (every parameter the sweep could set is given, so no keep-rate mapping is
# involved), in one sweep: one decode, one row each. On all 1000 images: the slow part of the run.
README_SPECS: list[str] = [
    "tome:r=4", "tome:r=8", "tome:r=11", "tome:r=13", "tome:r=16",
    "evit:keep=0.9", "evit:keep=0.8", "evit:keep=0.7", "evit:keep=0.6", "evit:keep=0.5",
    "evit:keep=0.7,fuse=false", "evit:keep=0.5,fuse=false", "evit:keep=0.7,fused_size=count",
    "topk:keep=0.7",
    "imagepiece:keep=0.9", "imagepiece:keep=0.8", "imagepiece:keep=0.7", "imagepiece:keep=0.6",
    "imagepiece:keep=0.5",
]

# One configuration per reducer and combination, and each non-default variant the README gives a number
# for: the default test run pins their exact counts on 100 images (the full list runs on all 1000).
SUBSET_SPECS: list[str] = [
    "tome:r=8", "tome:r=13", "evit:keep=0.7", "evit:keep=0.7,fuse=false", "evit:keep=0.7,fused_size=count",
    "topk:keep=0.7", "imagepiece:keep=0.7", "imagepiece:keep=0.7,retok=prune", "imagepiece:keep=0.7,locality=2",
    "imagepiece:keep=0.7,r=k/2", "mstm:keep=0.7", "imagepiece:keep=0.7+evit:keep=0.7", "imagepiece:keep=0.7+tome:r=8",
]

SWEEP_FIELDS = ("reducer_spec", "keep_rate", "gmacs_budget", "num_images", "tokens_per_layer", "final_tokens",
                "gmacs", "gmacs_analytic", "flop_counter", "correct1", "correct5")
ANALYSIS_HEAD = ("reducer_spec", "num_images", "tokens_per_layer", "final_tokens")
ANALYSIS_FIELDS: dict[str, tuple[str, ...]] = {
    "robustness": (*ANALYSIS_HEAD, "mask_count", "mask_fraction", "placement", "fill", "correct1", "correct5"),
    "similarity": (*ANALYSIS_HEAD, "layer", "features", "metric", "pairs", "mean_cos", "std_cos", "n_pairs"),
    "importance": (*ANALYSIS_HEAD, "layer", "top_p", "tokens", "share", "random_share", "n_top", "n_merged"),
    "attentiveness": (*ANALYSIS_HEAD, "layer", "attentive_rate", "population", "score", "share_became_attentive",
                      "n_became_attentive", "n_inattentive"),
    "coherence": (*ANALYSIS_HEAD, "locality", "retok", "stem", "correct1", "correct5", "gmacs", "gmacs_analytic",
                  "sim_metric", "sim_hidden", "sim_metric_first", "sim_hidden_first", "n_pairs"),
}
# How two values of a column are compared: exact text unless a tolerance is named here.
TOLERANCES: dict[str, float] = {
    "gmacs": 1e-4, "gmacs_analytic": 1e-4,
    "mean_cos": 1e-6, "std_cos": 1e-6, "share": 1e-6, "random_share": 1e-6, "share_became_attentive": 1e-6,
    "sim_metric": 1e-6, "sim_hidden": 1e-6, "sim_metric_first": 1e-6, "sim_hidden_first": 1e-6,
    "keep_rate": 1e-9, "gmacs_budget": 1e-9, "mask_fraction": 1e-9, "top_p": 1e-9, "attentive_rate": 1e-9,
    "locality": 1e-9,
}


@dataclass(frozen=True)
class Case:
    """One reference run: the commands (argv after `ipbench`, without model/weights/data/out) and the
    CSV columns pinned from each command's file."""

    name: str
    commands: tuple[tuple[str, ...], ...]
    slow: bool = False
    why: str = ""


def _sweep(*args: str) -> tuple[str, ...]:
    return ("sweep", "--no-speed", "--batch-size", "32", *args)


def _fixed(specs: list[str], limit: int | None) -> tuple[str, ...]:
    extra = ("--limit", str(limit)) if limit else ()
    return _sweep(*extra, *(x for spec in specs for x in ("--reducers", spec)))


CASES: dict[str, Case] = {c.name: c for c in [
    Case("subset100", (_fixed(SUBSET_SPECS, 100),),
         why="exact counts of every reducer and combination on 100 shared images (every 10th)"),
    Case("full1000", (_fixed(README_SPECS, None),), slow=True,
         why="the README's accuracy table on all 1000 shared images (equal to the official code's)"),
    Case("sweep200", (_sweep("--reducers", "tome,evit,imagepiece,mstm", "--keep-rates", "0.9,0.7,0.5",
                             "--limit", "200"),),
         why="the run-floor issue's behaviour check: keep rates mapped to each reducer's parameter"),
    Case("analyses32", (
        ("robustness", "--limit", "32", "--batch-size", "16", "--masks", "7,25"),
        ("similarity", "--limit", "32", "--batch-size", "16"),
        ("importance", "--limit", "32", "--batch-size", "16"),
        ("attentiveness", "--limit", "32", "--batch-size", "16", "--score", "token"),
        ("attentiveness", "--limit", "32", "--batch-size", "16"),
        ("coherence", "--limit", "32", "--batch-size", "16", "--localities", "0,2"),
    ), why="each analysis's numbers on 32 shared images, default reducers"),
]}


def fields_for(command: str) -> tuple[str, ...]:
    return SWEEP_FIELDS if command == "sweep" else ANALYSIS_FIELDS[command]


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def extract(out: Path, case: Case) -> dict[str, list[dict[str, str]]]:
    """The pinned columns of every row each command of `case` wrote under `out`, in file order."""
    got: dict[str, list[dict[str, str]]] = {}
    for argv in case.commands:
        command = argv[0]
        rows = read_csv_rows(out / f"{command}.csv")
        got[command] = [{k: r[k] for k in fields_for(command)} for r in rows]
    return got


def run_case(case: Case, invoke: Callable[[list[str]], Any], checkpoint: Path, data: Path, out: Path,
             ) -> dict[str, list[dict[str, str]]]:
    """Run every command of `case` (``invoke(argv)`` runs ``ipbench argv`` and returns its exit code)."""
    for argv in case.commands:
        args = [*argv, "--model", "deit_t", "--checkpoint", str(checkpoint), "--data", str(data),
                "--out", str(out), "--workers", "0"]
        code = invoke(args)
        if code != 0:
            raise RuntimeError(f"ipbench {' '.join(args)} exited with {code}")
    return extract(out, case)


def differences(expected: dict[str, list[dict[str, str]]], got: dict[str, list[dict[str, str]]]) -> list[str]:
    """Every cell where `got` differs from `expected` (tolerances above), as readable lines."""
    out: list[str] = []
    for command, want_rows in expected.items():
        have_rows = got.get(command, [])
        if len(have_rows) != len(want_rows):
            out.append(f"{command}: {len(have_rows)} rows, expected {len(want_rows)}")
            continue
        for i, (want, have) in enumerate(zip(want_rows, have_rows)):
            for k, v in want.items():
                w = have.get(k)
                if not _same(k, v, w):
                    out.append(f"{command} row {i} ({want.get('reducer_spec')}): {k} = {w!r}, expected {v!r}")
    return out


def _same(column: str, want: str, have: str | None) -> bool:
    if have is None:
        return False
    tol = TOLERANCES.get(column)
    if tol is None or want == have:
        return want == have
    try:
        return abs(float(want) - float(have)) <= tol
    except ValueError:
        return False
