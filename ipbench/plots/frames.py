"""Reading the result CSVs of a folder for figures and reports: kinds, de-duplication, labels, titles.

Every ipbench CSV in a folder is read defensively: a missing, empty or unknown file skips with a
note instead of failing, so a half-finished run can still be looked at. Nothing here imports torch
or the engine: a row's short label was written into its CSV (``reducer_label``, ``reducer_line``)
by the run that measured it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

# CSV kinds: the file stem a command writes, and the columns that identify the kind when a file
# was renamed (e.g. sweep_deit_s.csv).
SWEEP_KINDS = ("sweep", "flops", "speed")
ANALYSIS_COLUMNS: dict[str, tuple[str, ...]] = {
    "robustness": ("reducer_spec", "mask_count", "top1"),
    "similarity": ("reducer_spec", "layer", "features", "mean_cos"),
    "importance": ("reducer_spec", "layer", "top_p", "share"),
    "attentiveness": ("reducer_spec", "layer", "share_became_attentive"),
    "coherence": ("reducer_spec", "locality", "top1"),
}
KINDS = (*SWEEP_KINDS, "eval", *ANALYSIS_COLUMNS, "sensitivity", "finetune")
# Kinds whose rows are a series of one run (a fine-tune's curve), not one row per configuration: a row
# is the same as another when these columns are (a resumed run rewrites the steps after its checkpoint).
SERIES: dict[str, tuple[str, ...]] = {"finetune": ("config_key", "kind", "step")}
# Columns that qualify an analysis row beyond its reducer (a setting of the command); they join
# the row's label where a CSV holds several values of one.
QUALIFIERS: dict[str, tuple[str, ...]] = {
    "similarity": ("features", "pairs"),
    "importance": ("tokens",),
    "attentiveness": ("attentive_rate", "population", "score"),
}

# A fixed colour per reducer name, so a method looks the same in every figure.
REDUCER_COLORS = {
    "none": "black", "tome": "tab:blue", "evit": "tab:orange", "imagepiece": "tab:green",
    "mstm": "tab:purple", "topk": "tab:brown",
}
SPARE_COLORS = ["tab:red", "tab:pink", "tab:olive", "tab:cyan", "tab:gray", "gold", "navy", "teal",
                "maroon", "lime"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h"]
LINESTYLES = ["-", "--", "-.", ":"]


@dataclass
class ResultTable:
    """One CSV of the folder, as read."""

    kind: str  # one of KINDS
    path: Path
    df: pd.DataFrame


@dataclass
class PlotOutput:
    """What `plot_folder` made: figures per CSV (stem of the PNG/SVG pair) and notes on what was skipped."""

    tables: list[ResultTable] = field(default_factory=list)
    figures: dict[str, list[Path]] = field(default_factory=dict)  # csv file name -> PNG paths
    notes: list[str] = field(default_factory=list)


# -- reading ------------------------------------------------------------------------------------

# Columns that identify a renamed sweep or eval CSV (of this ipbench or an older one).
SWEEP_CORE = ("reducer_spec", "keep_rate", "gmacs", "gmacs_ratio", "tokens_per_layer")
EVAL_CORE = ("reducer", "skipped_images", "correct1", "tokens_per_layer")


# CSVs ipbench writes that are not measurements (derived from them): never read as result tables
NOT_RESULTS = frozenset({"compare.csv"})

def _kind_of(path: Path, columns: list[str]) -> str | None:
    if path.stem in KINDS:
        return path.stem
    cols = set(columns)
    if set(SWEEP_CORE) <= cols:
        return "sweep"
    if set(EVAL_CORE) <= cols:
        return "eval"
    for kind, needed in ANALYSIS_COLUMNS.items():
        if set(needed) <= cols:
            return kind
    return None


def read_folder(folder: str | os.PathLike) -> tuple[list[ResultTable], list[str]]:
    """Every ipbench CSV of `folder` (sorted by kind, then name) and notes on the files skipped."""
    import pandas as pd

    from ipbench.results import latest, read_rows

    tables: list[ResultTable] = []
    notes: list[str] = []
    for path in sorted(Path(folder).glob("*.csv")):
        if path.name in NOT_RESULTS:
            continue
        try:
            df = read_rows(path)
        except pd.errors.EmptyDataError:
            notes.append(f"{path.name}: empty file, skipped")
            continue
        except (pd.errors.ParserError, UnicodeDecodeError, OSError) as exc:
            notes.append(f"{path.name}: unreadable ({' '.join(str(exc).split())[:120]}), skipped")
            continue
        kind = _kind_of(path, list(df.columns))
        if kind is None:
            notes.append(f"{path.name}: not an ipbench result CSV, skipped")
            continue
        if df.empty:
            notes.append(f"{path.name}: no rows yet, skipped")
            continue
        if kind in SERIES:
            df = df.drop_duplicates(subset=[c for c in SERIES[kind] if c in df.columns], keep="last")
            tables.append(ResultTable(kind, path, df.reset_index(drop=True)))
        else:
            tables.append(ResultTable(kind, path, latest(df, QUALIFIERS.get(kind, ()))))
    tables.sort(key=lambda t: (KINDS.index(t.kind), t.path.name))
    return tables, notes


def numeric(df: pd.DataFrame, column: str) -> pd.Series:
    """A column as floats (NaN where empty or missing)."""
    import pandas as pd

    if column not in df.columns:
        return pd.Series(float("nan"), index=df.index, dtype=float)
    return pd.to_numeric(df[column], errors="coerce")


def has_values(df: pd.DataFrame, *columns: str) -> bool:
    """Whether every column exists and holds at least one number."""
    return all(c in df.columns and numeric(df, c).notna().any() for c in columns)


def missing(df: pd.DataFrame, *columns: str) -> list[str]:
    return [c for c in columns if c not in df.columns or not numeric(df, c).notna().any()]


def top1_bounds(df: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """The 95 % interval of each row's top-1, in percent: its `top1_low`/`top1_high` cells, else
    (a file of an older ipbench) Wilson's from its counts over `n_labelled` or `num_images`; nan
    where a row has neither."""
    import pandas as pd

    from ipbench.stats import interval

    lo, hi = list(numeric(df, "top1_low")), list(numeric(df, "top1_high"))
    n = numeric(df, "n_labelled").fillna(numeric(df, "num_images"))
    for i, (c, size) in enumerate(zip(numeric(df, "correct1"), n)):
        if lo[i] != lo[i] and c == c and size == size and size > 0:
            lo[i], hi[i] = interval(int(c), int(size))
    return pd.Series(lo, index=df.index, dtype=float), pd.Series(hi, index=df.index, dtype=float)


def with_interval(value: float, low: float, high: float, digits: int = 2) -> str:
    """'86.70 [84.45, 88.66]': a percentage and its interval for a table cell ('-' without a value)."""
    if value != value:
        return "-"
    if low != low or high != high:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def interval_cell(row: dict[str, Any], digits: int = 2) -> str:
    """`with_interval` of one row as a dict (a CSV row's strings, or the values written): its top1
    and its 95 % interval, '-' where it has no top1."""
    def num(key: str) -> float:
        value = row.get(key, "")
        return float("nan") if value in ("", None) else float(value)

    return with_interval(num("top1"), num("top1_low"), num("top1_high"), digits)


def as_percent(values: pd.Series) -> pd.Series:
    """Shares in percent: values all within [0, 1] are taken as fractions and scaled by 100."""
    finite = values.dropna()
    if len(finite) and finite.abs().max() <= 1.0:
        return values * 100
    return values


# -- labels -------------------------------------------------------------------------------------

def _split_params(body: str) -> list[tuple[str, str]]:
    """'keep=0.7,layers=3,6,9' -> [('keep','0.7'), ('layers','3,6,9')] (list values hold commas)."""
    items: list[tuple[str, str]] = []
    for part in body.split(","):
        if "=" in part:
            k, v = part.split("=", 1)
            items.append((k.strip(), v.strip()))
        elif items:
            items[-1] = (items[-1][0], f"{items[-1][1]},{part.strip()}")
    return items


def rate_text(label: str, line: str) -> str:
    """What tells the rows of one line apart: the parameters in a row's label that its line's name
    lacks ('keep=0.7', or ToMe's 'r=13')."""
    bits = []
    for part, base in zip(str(label).split("+"), str(line).split("+")):
        have = dict(_split_params(base.partition(":")[2]))
        bits += [f"{k}={v}" for k, v in _split_params(part.partition(":")[2]) if have.get(k) != v]
    return ", ".join(bits)


def _base_name(spec: str) -> str:
    return str(spec).split(":", 1)[0]


def is_baseline(spec: Any) -> bool:
    return str(spec).strip() in ("none", "")


def spec_column(df: pd.DataFrame) -> str:
    """The column naming a row's reducer: the full spec where the CSV has it."""
    for c in ("reducer_spec", "reducer"):
        if c in df.columns:
            return c
    raise KeyError("reducer_spec")


def _filled(df: pd.DataFrame, column: str, fallback: pd.Series) -> pd.Series:
    if column not in df.columns:
        return fallback
    values = df[column]
    return values.where(values.notna() & (values.astype(str) != ""), fallback).astype(str)


def row_labels(df: pd.DataFrame) -> pd.Series:
    """Each row's short label (the run wrote it); a CSV of an older ipbench shows the full spec."""
    return _filled(df, "reducer_label", df[spec_column(df)].astype(str))


def row_lines(df: pd.DataFrame) -> pd.Series:
    """Each row's line name (its label without the swept knob); older CSVs: the reducer's name."""
    return _filled(df, "reducer_line", df[spec_column(df)].map(_base_name))


def qualified_label(df: pd.DataFrame, qualifiers: tuple[str, ...] | list[str]) -> pd.Series:
    """Short label of each row, plus the qualifier columns that take several values in `df`
    (e.g. 'imagepiece:keep=0.7 · population=inattentive')."""
    label = row_labels(df)
    for q in qualifiers:
        if q in df.columns and df[q].dropna().astype(str).nunique() > 1:
            label = label + f" · {q}=" + df[q].astype(str)
    return label


class Styler:
    """Colour, marker and line style per line label, stable within a figure."""

    def __init__(self) -> None:
        self.styles: dict[str, dict[str, Any]] = {}
        self.used: set[str] = set()

    def __call__(self, label: str) -> dict[str, Any]:
        if label not in self.styles:
            i = len(self.styles)
            color = REDUCER_COLORS.get(label) or REDUCER_COLORS.get(_base_name(label))
            if color is None or color in self.used:
                color = next((c for c in SPARE_COLORS if c not in self.used), SPARE_COLORS[i % len(SPARE_COLORS)])
            self.used.add(color)
            self.styles[label] = {"color": color, "marker": MARKERS[i % len(MARKERS)],
                                  "linestyle": LINESTYLES[(i // len(MARKERS)) % len(LINESTYLES)]}
        return self.styles[label]


# -- titles -------------------------------------------------------------------------------------

def _values(df: pd.DataFrame, column: str) -> list[str]:
    if column not in df.columns:
        return []
    return [str(v) for v in df[column].dropna().unique() if str(v) != ""]


def data_name(path: str) -> str:
    """A data path as a reader knows it: the folder or file name ('synthetic' as is)."""
    return Path(str(path).rstrip("/")).name or str(path)


def run_summary(df: pd.DataFrame) -> str:
    """'deit_tiny_patch16_224 · nips17-dev · 1000 images', from the rows (several values joined)."""
    models = _values(df, "model")
    datas = [data_name(d) for d in _values(df, "data")]
    counts = sorted({int(float(n)) for n in _values(df, "num_images")})
    parts = [", ".join(models) or "model ?", ", ".join(dict.fromkeys(datas)) or "data ?"]
    if counts:
        parts.append(f"{'/'.join(map(str, counts))} images")
    return " · ".join(parts)


def hardware_summary(df: pd.DataFrame) -> str:
    dev = ", ".join(_values(df, "device_name") or _values(df, "device"))
    batch = _values(df, "batch_size")
    threads = _values(df, "threads")
    bits = [dev] if dev else []
    if batch:
        bits.append(f"batch {'/'.join(batch)}")
    if threads and "cpu" in _values(df, "device"):
        bits.append(f"{'/'.join(threads)} threads")
    return ", ".join(bits)


def training_note(df: pd.DataFrame) -> str:
    """'training-free' where every row's reducer is and no row ran weights fine-tuned with one."""
    vals = {v.lower() for v in _values(df, "training_free")}
    if vals and vals <= {"true", "1", "1.0"} and not _values(df, "trained_with"):
        return "training-free"
    return ""


def _title(ax_or_fig: Any, what: str, df: pd.DataFrame, extra: str = "") -> None:
    sub = " · ".join(b for b in (training_note(df), extra) if b)
    text = f"{what}\n{run_summary(df)}" + (f"\n{sub}" if sub else "")
    if hasattr(ax_or_fig, "suptitle"):
        ax_or_fig.suptitle(text, fontsize=10)
    else:
        ax_or_fig.set_title(text, fontsize=10)


def runs(df: pd.DataFrame) -> Iterator[tuple[str, pd.DataFrame]]:
    """Split rows by (model, data, image count): each group is one figure, with a name suffix
    when there are several (rows of different runs must not share axes)."""
    keys = [k for k in ("model", "data", "num_images") if k in df.columns]
    if not keys:
        yield "", df
        return
    groups = list(df.groupby(keys, sort=False, dropna=False))
    if len(groups) == 1:
        yield "", df
        return
    for key, sub in groups:
        key = key if isinstance(key, tuple) else (key,)
        bits = dict(zip(keys, key))
        suffix = "_".join(str(b) for b in (bits.get("model"), data_name(str(bits.get("data", ""))),
                                           bits.get("num_images")) if b not in (None, ""))
        yield "_" + "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in suffix), sub
