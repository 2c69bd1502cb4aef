"""`ipbench compare`: which differences between rows of a results folder are real.

Two rows are compared on their per-image records (``OUT/predictions/<config_key>.csv.gz``), which
must hold the same images with the same labels in the same order (same model, data and image
count); see `ipbench.stats` for the test, the intervals and the resolvable difference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ipbench import results, stats
from ipbench.errors import UserError

COMPARABLE = ("eval", "sweep")  # the CSVs whose rows compare one to one (robustness: per mask count)
SAME_IMAGES = ("model", "data", "num_images")  # rows compared must agree on these


@dataclass(frozen=True)
class Pair:
    a: dict[str, Any]
    b: dict[str, Any]
    result: stats.Comparison


def _label(row: dict[str, Any]) -> str:
    return str(row.get("reducer_label") or row.get("reducer_spec") or row.get("reducer"))


def _matches(row: dict[str, Any], spec: str) -> bool:
    return spec in {str(row.get("reducer_label", "")), str(row.get("reducer_spec", "")), str(row.get("reducer", ""))}


def _correct(folder: Path, row: dict[str, Any]) -> Any:
    import pandas as pd

    path = results.predictions_path(folder, str(row["config_key"]))
    if not path.exists():
        raise UserError(f"{_label(row)}: no per-image records ({path}); rerun it with this ipbench to compare it")
    frame = pd.read_csv(path)
    return frame["label"].to_numpy(), frame["correct1"].fillna(0).astype(bool).to_numpy()


def compare_folder(folder: str | os.PathLike, command: str = "sweep", a: str | None = None,
                   b: str | None = None, keys: set[str] | None = None) -> list[Pair]:
    """Pairs of rows of FOLDER/<command>.csv and their comparison: `a` against `b` where both are
    given, else the default pairs (`_default_pairs`); only rows whose config_key is in `keys`
    where given (the rows one sweep wrote)."""
    if command not in COMPARABLE:
        raise UserError(f"unknown --from {command!r}; valid: {', '.join(COMPARABLE)}")
    if (a is None) != (b is None):
        raise UserError("--a and --b go together (or give neither: every reducer against the baseline)")
    root = Path(folder)
    frame = results.read_rows(root / f"{command}.csv")
    if frame.empty or "correct1" not in frame.columns:
        raise UserError(f"{root / f'{command}.csv'}: no rows to compare")
    rows = [r for r in results.latest(frame).to_dict("records") if str(r.get("correct1", "")) not in ("", "nan")
            and (keys is None or str(r.get("config_key")) in keys)]
    todo: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for group in _groups(rows):
        if a is not None and b is not None:
            todo += [(x, y) for x in group if _matches(x, a) for y in group if _matches(y, b)]
            continue
        todo += _default_pairs(group)
    if not todo:
        wanted = f"rows {a!r} and {b!r}" if a is not None else "a reducer and the baseline"
        raise UserError(f"{root / f'{command}.csv'}: no {wanted} measured on the same images")
    records: dict[str, Any] = {}  # each file read once: the baseline is in many pairs

    def correct(row: dict[str, Any]) -> Any:
        key = str(row["config_key"])
        if key not in records:
            records[key] = _correct(root, row)
        return records[key]

    out = []
    for x, y in todo:
        (labels_x, cx), (labels_y, cy) = correct(x), correct(y)
        if len(labels_x) != len(labels_y) or (labels_x != labels_y).any():
            raise UserError(f"{_label(x)} and {_label(y)}: their records are not of the same images")
        out.append(Pair(x, y, stats.compare(cx, cy)))
    return out


GMACS_MATCH = 0.05  # two reducers within 5 % of each other's GMACs are compared as "about equal cost"


def _default_pairs(group: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The comparisons a reader of a sweep asks for, each pair once, in row order: every reducer
    against the baseline; two reducers at the same keep rate or GMACs budget, or within GMACS_MATCH
    of each other's GMACs; and neighbouring settings of one reducer (tome:r=8 against tome:r=11)."""
    def num(r: dict[str, Any], col: str) -> float | None:
        try:
            v = float(r.get(col, ""))
        except (TypeError, ValueError):
            return None
        return None if v != v else v

    base = [r for r in group if r.get("reducer") == "none"]
    others = [r for r in group if r.get("reducer") != "none"]
    pairs = [(base[0], r) for r in others] if base else []
    for i, x in enumerate(others):
        for y in others[i + 1:]:
            same_knob = any(num(x, c) is not None and num(x, c) == num(y, c) for c in ("keep_rate", "gmacs_budget"))
            gx, gy = num(x, "gmacs"), num(y, "gmacs")
            close = gx is not None and gy is not None and x.get("reducer") != y.get("reducer") \
                and abs(gx - gy) <= GMACS_MATCH * max(gx, gy)
            if same_knob or close:
                pairs.append((x, y))
    lines: dict[str, list[dict[str, Any]]] = {}
    for r in others:
        lines.setdefault(str(r.get("reducer_line") or r.get("reducer")), []).append(r)
    for rows in lines.values():
        pairs += list(zip(rows, rows[1:]))
    seen: set[tuple[str, str]] = set()
    out = []
    for x, y in pairs:
        key = (str(x["config_key"]), str(y["config_key"]))
        if key not in seen and key[::-1] not in seen:
            seen.add(key)
            out.append((x, y))
    return out


def _groups(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Rows measured on the same images (same model, data and image count), in file order."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(str(r.get(c, "")) for c in SAME_IMAGES), []).append(r)
    return list(groups.values())


def verdict(result: stats.Comparison) -> str:
    return f"p={result.p_value:.3g}" + ("" if result.significant else " (not significant)")


def pair_record(pair: Pair) -> dict[str, Any]:
    """One line of compare.csv."""
    r = pair.result
    lo_a, hi_a = stats.interval(r.correct_a, r.n)
    lo_b, hi_b = stats.interval(r.correct_b, r.n)
    return {"a": _label(pair.a), "b": _label(pair.b), "images": r.n,
            "top1_a": round(r.top1_a, 3), "top1_a_low": round(lo_a, 3), "top1_a_high": round(hi_a, 3),
            "top1_b": round(r.top1_b, 3), "top1_b_low": round(lo_b, 3), "top1_b_high": round(hi_b, 3),
            "diff": round(r.diff, 3), "diff_low": round(r.diff_low, 3), "diff_high": round(r.diff_high, 3),
            "a_only": r.a_only, "b_only": r.b_only, "p_mcnemar": round(r.p_value, 6),
            "significant": r.significant, "min_detectable": round(r.min_detectable, 3)}


def shown_rows(pairs: list[Pair], compact: bool = False) -> list[dict[str, Any]]:
    """The comparison table as it is shown (the terminal's and REPORT.md's): one dict per pair.
    `compact` (under a sweep table, which already gives each top-1 with its interval): the top-1s
    without their intervals and no image count."""
    out = []
    for pair in pairs:
        r = pair_record(pair)
        if compact:
            tops = {"top-1 a": f"{r['top1_a']:.1f}", "top-1 b": f"{r['top1_b']:.1f}"}
        else:
            tops = {"images": r["images"],
                    "top-1 a [95 % CI]": f"{r['top1_a']:.1f} [{r['top1_a_low']:.1f}, {r['top1_a_high']:.1f}]",
                    "top-1 b [95 % CI]": f"{r['top1_b']:.1f} [{r['top1_b_low']:.1f}, {r['top1_b_high']:.1f}]"}
        out.append({"a": r["a"], "b": r["b"], **tops,
                    "b - a [95 % CI]": f"{r['diff']:+.1f} [{r['diff_low']:+.1f}, {r['diff_high']:+.1f}]",
                    "a only / b only": f"{r['a_only']} / {r['b_only']}", "McNemar": verdict(pair.result)})
    return out


def resolvable(pairs: list[Pair]) -> tuple[float, float]:
    """The smallest and largest difference (points) the pairs resolve at stats.POWER."""
    values = [pair.result.min_detectable for pair in pairs]
    return min(values), max(values)
