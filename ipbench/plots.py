"""Figures from the result CSVs of a folder: what a reader must see at a glance.

Every ipbench CSV in a folder is read defensively: a missing, empty or unknown file, or a column
that a figure needs but the file lacks, skips that figure with a note instead of failing, so a
half-finished run can still be looked at. Figures go to ``<folder>/plots/<name>.png`` and ``.svg``.

Each figure says what was measured (model, data, image count, device) in its title, has axis
units and a legend, and draws the baseline (reducer ``none``) as a reference line.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

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
KINDS = (*SWEEP_KINDS, "eval", *ANALYSIS_COLUMNS)
# Columns that qualify an analysis row beyond its reducer (a setting of the command); they join
# the row's label where a CSV holds several values of one.
QUALIFIERS: dict[str, tuple[str, ...]] = {
    "similarity": ("features", "pairs"),
    "importance": ("tokens",),
    "attentiveness": ("attentive_rate", "population"),
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
# Parameters a sweep varies along a line; left out of the line's label.
SWEPT_PARAMS = {"keep": None, "r": {"tome"}}


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

def _kind_of(path: Path, columns: list[str]) -> str | None:
    from ipbench.results import EVAL_COLUMNS, SWEEP_COLUMNS

    if path.stem in KINDS:
        return path.stem
    cols = set(columns)
    if set(SWEEP_COLUMNS) <= cols:
        return "sweep"
    if set(EVAL_COLUMNS) <= cols:
        return "eval"
    for kind, needed in ANALYSIS_COLUMNS.items():
        if set(needed) <= cols:
            return kind
    return None


def read_folder(folder: str | os.PathLike) -> tuple[list[ResultTable], list[str]]:
    """Every ipbench CSV of `folder` (sorted by kind, then name) and notes on the files skipped."""
    import pandas as pd

    from ipbench.results import read_rows

    tables: list[ResultTable] = []
    notes: list[str] = []
    for path in sorted(Path(folder).glob("*.csv")):
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
        tables.append(ResultTable(kind, path, dedup(df, kind)))
    tables.sort(key=lambda t: (KINDS.index(t.kind), t.path.name))
    return tables, notes


def dedup(df: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Keep the last row of each measurement (a re-run with --force appends a newer row)."""
    if kind in SWEEP_KINDS or kind == "eval":
        keys = ["config_key"] if "config_key" in df.columns else []
    else:
        extra = {"robustness": ["mask_count", "mask_fraction", "placement", "fill", "seed"],
                 "similarity": ["layer", *QUALIFIERS["similarity"]], "importance": ["layer", "top_p",
                                                                                  *QUALIFIERS["importance"]],
                 "attentiveness": ["layer", *QUALIFIERS["attentiveness"]],
                 "coherence": ["locality", "retok", "stem"]}[kind]
        keys = ["model", "data", "num_images", "reducer_spec", *extra]
    keys = [k for k in keys if k in df.columns]
    if not keys:
        return df.reset_index(drop=True)
    return df.drop_duplicates(subset=keys, keep="last").reset_index(drop=True)


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


def _defaults(names: list[str]) -> list[dict[str, str]] | None:
    try:
        from ipbench.reducers import parse_spec

        canon = parse_spec("+".join(names)).spec
    except Exception:  # an unknown or renamed reducer: keep the full spec
        return None
    return [dict(_split_params(p.split(":", 1)[1] if ":" in p else "")) for p in canon.split("+")]


def short_spec(spec: str, drop_swept: bool = False) -> str:
    """The spec with only the parameters that differ from the reducer's defaults, plus the rate
    (keep; r for ToMe), which a reader always needs.

    drop_swept instead leaves out the parameter a sweep varies (keep; r for ToMe), giving the name of
    the line a row belongs to in accuracy-vs-cost figures.
    """
    spec = str(spec).strip()
    parts = spec.split("+")
    names = [p.split(":", 1)[0] for p in parts]
    defaults = _defaults(names)
    out = []
    for i, part in enumerate(parts):
        name = names[i]
        params = _split_params(part.split(":", 1)[1]) if ":" in part else []
        default = defaults[i] if defaults and i < len(defaults) else {}
        kept = []
        for k, v in params:
            swept = k in SWEPT_PARAMS and (SWEPT_PARAMS[k] is None or name in SWEPT_PARAMS[k])
            if (swept and drop_swept) or (default.get(k) == v and not swept):
                continue
            kept.append(f"{k}={v}")
        out.append(f"{name}:{','.join(kept)}" if kept else name)
    return "+".join(out)


def rate_label(spec: str) -> str:
    """Only the rate of a spec ('keep=0.7', 'r=13'): what tells the rows of one line apart."""
    bits = []
    for part in short_spec(spec).split("+"):
        name, _, body = part.partition(":")
        for k, v in _split_params(body):
            if k in SWEPT_PARAMS and (SWEPT_PARAMS[k] is None or name in SWEPT_PARAMS[k]):
                bits.append(f"{k}={v}")
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


def qualified_label(df: pd.DataFrame, qualifiers: tuple[str, ...] | list[str]) -> pd.Series:
    """Short spec of each row, plus the qualifier columns that take several values in `df`
    (e.g. 'imagepiece:keep=0.7 · population=inattentive')."""
    label = df[spec_column(df)].map(short_spec)
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
    vals = {v.lower() for v in _values(df, "training_free")}
    if vals and vals <= {"true", "1", "1.0"}:
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


# -- figures ------------------------------------------------------------------------------------

def _new(ncols: int = 1, width: float = 6.4, height: float = 4.6) -> tuple[Figure, list[Axes]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols if ncols > 1 else width, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, list(axes)


def _baseline_rows(df: pd.DataFrame) -> pd.DataFrame:
    col = spec_column(df)
    return df[df[col].map(is_baseline)]


def _line_label(df: pd.DataFrame) -> pd.Series:
    col = spec_column(df)
    return df[col].map(lambda s: short_spec(s, drop_swept=True))


def _fmt_tokens(v: float) -> str:
    return str(int(v)) if v == v else "?"


def fig_accuracy_vs(df: pd.DataFrame, x: str, xlabel: str, what: str, hardware: bool) -> Figure | None:
    """Top-1 against a cost or speed column, one line per reducer, the baseline as reference."""
    if not has_values(df, "top1", x):
        return None
    fig, (ax,) = _new()
    styler = Styler()
    df = df.assign(_x=numeric(df, x), _y=numeric(df, "top1"), _label=_line_label(df))
    base = _baseline_rows(df).dropna(subset=["_x", "_y"])
    for label, sub in df[~df.index.isin(base.index)].dropna(subset=["_x", "_y"]).groupby("_label", sort=True):
        sub = sub.sort_values("_x")
        st = styler(str(label))
        xerr = None
        lo_col, hi_col = {"img_s_median": ("img_s_min", "img_s_max"),
                          "speedup_median": ("speedup_min", "speedup_max")}.get(x, (None, None))
        if lo_col and has_values(sub, lo_col, hi_col):
            lo, hi = numeric(sub, lo_col), numeric(sub, hi_col)
            xerr = [(sub["_x"] - lo).clip(lower=0).fillna(0), (hi - sub["_x"]).clip(lower=0).fillna(0)]
        ax.errorbar(sub["_x"], sub["_y"], xerr=xerr, label=str(label), capsize=2, markersize=5, **st)
        for xv, yv, spec in zip(sub["_x"], sub["_y"], sub[spec_column(sub)]):
            rate = rate_label(spec).replace("keep=", "")  # '0.7', or ToMe's 'r=13'
            if rate:
                ax.annotate(rate, (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=st["color"])
    if not base.empty:
        b = base.iloc[-1]
        ax.axhline(b["_y"], color="black", linestyle="--", linewidth=1, alpha=0.7)
        ax.plot([b["_x"]], [b["_y"]], marker="*", markersize=13, color="black", linestyle="none",
                label=f"baseline (no reduction): {b['_y']:.1f} %")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.legend(fontsize=8, loc="best")
    extra = hardware_summary(df) if hardware else ""
    _title(ax, what, df, extra)
    ax.text(0.99, 0.01, "point labels: keep rate (ToMe: r)", transform=ax.transAxes, ha="right", va="bottom",
            fontsize=7, color="gray")
    if x == "gmacs" and "flop_counter" in df.columns:
        counters = ", ".join(_values(df, "flop_counter"))
        if counters:
            ax.set_xlabel(f"GMACs per image ({counters})")
    return fig


def fig_speedup_vs_gmacs_ratio(df: pd.DataFrame) -> Figure | None:
    """Measured speed-up against the GMACs ratio: how much of the saved compute becomes speed."""
    if not has_values(df, "speedup_median", "gmacs_ratio"):
        return None
    fig, (ax,) = _new()
    styler = Styler()
    df = df.assign(_x=numeric(df, "gmacs_ratio"), _y=numeric(df, "speedup_median"), _label=_line_label(df))
    df = df.dropna(subset=["_x", "_y"])
    df = df[~df[spec_column(df)].map(is_baseline)]
    if df.empty:
        return None
    for label, sub in df.groupby("_label", sort=True):
        sub = sub.sort_values("_x")
        lo, hi = numeric(sub, "speedup_min"), numeric(sub, "speedup_max")
        yerr = [(sub["_y"] - lo).clip(lower=0).fillna(0), (hi - sub["_y"]).clip(lower=0).fillna(0)]
        ax.errorbar(sub["_x"], sub["_y"], yerr=yerr, label=str(label), capsize=2, markersize=5, **styler(str(label)))
    top = max(float(df["_x"].max()), float(df["_y"].max()), 1.0) * 1.05
    ax.plot([1, top], [1, top], color="black", linestyle="--", linewidth=1, label="speed-up = GMACs ratio")
    ax.plot([1, top], [0.9, 0.9 * top], color="gray", linestyle=":", linewidth=1, label="0.9 × GMACs ratio")
    ax.axhline(1.0, color="black", linewidth=0.8, alpha=0.5)
    ax.set_xlabel("GMACs ratio (baseline GMACs / reducer GMACs)")
    ax.set_ylabel("measured speed-up (× baseline, median of paired rounds)")
    ax.legend(fontsize=8, loc="best")
    _title(ax, "Speed-up vs compute saved", df, hardware_summary(df))
    return fig


def _tokens(row: pd.Series) -> list[int]:
    try:
        return [int(t) for t in str(row.get("tokens_per_layer", "")).split()]
    except ValueError:
        return []


def fig_tokens_per_layer(df: pd.DataFrame) -> Figure | None:
    """Tokens after each block: one panel per reducer, one line per setting (keep rate)."""
    import matplotlib as mpl

    if "tokens_per_layer" not in df.columns:
        return None
    df = df.assign(_tok=df.apply(_tokens, axis=1), _label=_line_label(df))
    df = df[df["_tok"].map(len) > 0]
    if df.empty:
        return None
    base = _baseline_rows(df)
    reduced = df[~df.index.isin(base.index)]
    labels = sorted(reduced["_label"].unique()) or ["none"]
    ncols = min(len(labels), 3)
    nrows = math.ceil(len(labels) / ncols)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6 * ncols, 3.6 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    cmap = mpl.colormaps["viridis"]
    for ax, label in zip(axes, labels):
        ax.grid(True, alpha=0.3)
        if not base.empty:
            t = base.iloc[-1]["_tok"]
            ax.plot(range(len(t)), t, color="black", linestyle="--", linewidth=1, label="baseline")
        sub = reduced[reduced["_label"] == label]
        sub = sub.assign(_k=numeric(sub, "keep_rate")).sort_values("_k", ascending=False)
        rows = sub.drop_duplicates(subset=[spec_column(sub)], keep="last")
        for i, (_, row) in enumerate(rows.iterrows()):
            name = rate_label(row[spec_column(sub)]) or short_spec(row[spec_column(sub)])
            color = (cmap(0.1 + 0.8 * i / max(1, len(rows) - 1)) if len(rows) > 1
                     else REDUCER_COLORS.get(_base_name(label), "tab:blue"))
            t = row["_tok"]
            ax.plot(range(len(t)), t, marker=".", color=color, label=f"{name}: {t[-1]} tokens")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("block (0-indexed)")
        ax.set_ylabel("tokens after the block")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7, loc="lower left")
    for ax in axes[len(labels):]:
        ax.set_visible(False)
    _title(fig, "Tokens after each block", df)
    return fig


def fig_eval_top1(df: pd.DataFrame) -> Figure | None:
    """Top-1 per reducer of single evaluations, as bars beside the baseline line."""
    if not has_values(df, "top1"):
        return None
    df = df.assign(_y=numeric(df, "top1"), _label=df[spec_column(df)].map(short_spec)).dropna(subset=["_y"])
    base = _baseline_rows(df)
    rest = df[~df.index.isin(base.index)]
    fig, (ax,) = _new(height=max(2.8, 0.45 * (len(rest) + 1) + 1.8))
    styler = Styler()
    names = list(rest["_label"])
    ax.barh(range(len(names)), rest["_y"], color=[styler(n)["color"] for n in names])
    for i, (v, t) in enumerate(zip(rest["_y"], numeric(rest, "final_tokens"))):
        ax.text(v, i, f" {v:.1f} %" + (f" · {int(t)} tokens" if t == t else ""), va="center", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    if not base.empty:
        b = float(base.iloc[-1]["_y"])
        ax.axvline(b, color="black", linestyle="--", linewidth=1, label=f"baseline (no reduction): {b:.1f} %")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel("top-1 accuracy (%)")
    ax.set_xlim(0, 105)
    _title(ax, "Top-1 per reducer (ipbench eval)", df)
    return fig


def _baseline_value(df: pd.DataFrame, y: str) -> float | None:
    base = _baseline_rows(df)
    vals = numeric(base, y).dropna()
    return float(vals.iloc[-1]) if len(vals) else None


def fig_robustness(df: pd.DataFrame) -> Figure | None:
    """Top-1 against the number (or fraction) of masked patches, per reducer (paper Table 4)."""
    x = "mask_count" if has_values(df, "mask_count") else "mask_fraction"
    if not has_values(df, x, "top1"):
        return None
    settings_cols = [c for c in ("placement", "fill") if c in df.columns]
    df = df.assign(_x=numeric(df, x), _y=numeric(df, "top1"), _label=df[spec_column(df)].map(short_spec))
    settings = list(df.groupby(settings_cols, sort=True, dropna=False)) if settings_cols else [("", df)]
    fig, axes = _new(ncols=len(settings), width=6.0)
    for ax, (key, sub) in zip(axes, settings):
        styler = Styler()
        for label, line in sub.dropna(subset=["_x", "_y"]).groupby("_label", sort=True):
            line = line.sort_values("_x")
            st = styler(str(label))
            if is_baseline(label):
                st = {**st, "color": "black", "linestyle": "--"}
            ax.plot(line["_x"], line["_y"], label=str(label), markersize=5, **st)
        where = ", ".join(f"{c} {v}" for c, v in zip(settings_cols, key if isinstance(key, tuple) else (key,)))
        ax.set_title(f"masks: {where}" if where else "", fontsize=9)
        ax.set_xlabel("masked 16×16 patches per image" if x == "mask_count" else "fraction of patches masked")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.legend(fontsize=8)
    _title(fig, "Robustness to random patch masks (paper Table 4)", df)
    return fig


def fig_similarity(df: pd.DataFrame) -> Figure | None:
    """Mean cosine similarity of merged pairs per block, per reducer (paper Tables 6 and 8)."""
    if not has_values(df, "layer", "mean_cos"):
        return None
    df = df.assign(_x=numeric(df, "layer"), _y=numeric(df, "mean_cos"), _label=qualified_label(df, ("pairs",)))
    feats = sorted(df["features"].dropna().astype(str).unique()) if "features" in df.columns else [""]
    fig, axes = _new(ncols=len(feats), width=6.0)
    names = {"metric": "matching metric (head-mean keys)", "hidden": "hidden states"}
    styler = Styler()
    for ax, feat in zip(axes, feats):
        sub = df if feat == "" else df[df["features"].astype(str) == feat]
        for label, line in sub.dropna(subset=["_x", "_y"]).groupby("_label", sort=True):
            line = line.sort_values("_x")
            ax.plot(line["_x"], line["_y"], label=str(label), markersize=5, **styler(str(label)))
        ax.set_title(f"features: {names.get(feat, feat)}" if feat else "", fontsize=9)
        ax.set_xlabel("block (0-indexed)")
        ax.set_ylabel("mean cosine similarity of merged pairs")
        ax.legend(fontsize=8)
    _title(fig, "Similarity of merged token pairs (paper Tables 6, 8)", df)
    return fig


def fig_importance(df: pd.DataFrame) -> Figure | None:
    """Share of merged tokens in the top-p% by CLS attention, against random choice (Table 7)."""
    if not has_values(df, "layer", "top_p", "share"):
        return None
    df = df.assign(_x=numeric(df, "layer"), _p=numeric(df, "top_p"), _y=as_percent(numeric(df, "share")),
                   _r=as_percent(numeric(df, "random_share")), _label=qualified_label(df, QUALIFIERS["importance"]))
    labels = sorted(df["_label"].unique())
    fig, axes = _new(ncols=len(labels), width=5.6)
    cmap_colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for ax, label in zip(axes, labels):
        sub = df[df["_label"] == label]
        for i, (p, line) in enumerate(sub.dropna(subset=["_x", "_y"]).groupby("_p", sort=True)):
            line = line.sort_values("_x")
            color = cmap_colors[i % len(cmap_colors)]
            pl = p * 100 if p <= 1 else p
            ax.plot(line["_x"], line["_y"], marker="o", color=color, label=f"top {pl:g} %")
            if line["_r"].notna().any():
                ax.plot(line["_x"], line["_r"], linestyle=":", color=color, linewidth=1)
        ax.set_title(f"{label}  (dotted: random tokens)", fontsize=9)
        ax.set_xlabel("block (0-indexed)")
        ax.set_ylabel("merged tokens in the top p % by CLS attention (%)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8)
    _title(fig, "Are merged tokens important? (paper Table 7: first block)", df)
    return fig


def fig_attentiveness(df: pd.DataFrame) -> Figure | None:
    """Share of inattentive tokens that became attentive after re-tokenization, per block (Table 5)."""
    if not has_values(df, "layer", "share_became_attentive"):
        return None
    df = df.assign(_x=numeric(df, "layer"), _y=as_percent(numeric(df, "share_became_attentive")),
                   _label=qualified_label(df, QUALIFIERS["attentiveness"])).dropna(subset=["_x", "_y"])
    labels = sorted(df["_label"].unique())
    layers = sorted(df["_x"].unique())
    fig, (ax,) = _new()
    styler = Styler()
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        sub = df[df["_label"] == label].set_index("_x")["_y"]
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(layers))]
        ys = [float(sub.get(layer, float("nan"))) for layer in layers]
        bars = ax.bar(xs, ys, width=width, label=label, color=styler(label)["color"])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(layers)), [f"{int(v)}" for v in layers])
    ax.set_xlabel("re-tokenize block (0-indexed)")
    ax.set_ylabel("inattentive tokens attentive in the next block (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    _title(ax, "Inattentive → attentive after re-tokenization (paper Table 5)", df)
    return fig


def fig_coherence(df: pd.DataFrame) -> Figure | None:
    """Top-1 and merged-pair similarity against the locality penalty (Table 8, training-free)."""
    if not has_values(df, "locality", "top1"):
        return None
    groups = [c for c in ("retok", "stem") if c in df.columns]
    df = df.assign(_x=numeric(df, "locality"))
    df = df.assign(_label=df[groups].astype(str).agg(", ".join, axis=1) if groups else "imagepiece")
    panels: list[tuple[list[tuple[str, str]], str]] = [([("top1", "")], "top-1 accuracy (%)")]
    for feat, name in (("metric", "matching metric"), ("hidden", "hidden states")):
        cols = [(c, t) for c, t in ((f"sim_{feat}", "all blocks"), (f"sim_{feat}_first", "first re-tokenize block"))
                if has_values(df, c)]
        if cols:
            panels.append((cols, f"mean cosine of merged pairs ({name})"))
    fig, axes = _new(ncols=len(panels), width=5.2)
    styler = Styler()
    for ax, (cols, ylabel) in zip(axes, panels):
        for j, (col, what) in enumerate(cols):
            d = df.assign(_y=numeric(df, col)).dropna(subset=["_x", "_y"])
            for label, line in d.groupby("_label", sort=True):
                line = line.sort_values("_x")
                st = {**styler(str(label)), **({"linestyle": "--", "alpha": 0.7} if j else {})}
                ax.plot(line["_x"], line["_y"], label=f"{label}" + (f" ({what})" if what else ""),
                        markersize=5, **st)
        ax.set_xlabel("locality penalty λ (0 = off)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7, title=", ".join(groups) if groups else None, title_fontsize=7)
    _title(fig, "Local coherence: locality penalty λ (paper Table 8)", df)
    return fig


FigureMaker = Callable[["pd.DataFrame"], "Figure | None"]

SWEEP_FIGURES: list[tuple[str, FigureMaker, list[str]]] = [
    ("top1_vs_throughput", lambda df: fig_accuracy_vs(
        df, "img_s_median", "throughput (images / s, median; bars: min–max)",
        "Top-1 vs throughput (cf. paper Fig. 3)", True), ["top1", "img_s_median"]),
    ("top1_vs_gmacs", lambda df: fig_accuracy_vs(
        df, "gmacs", "GMACs per image", "Top-1 vs compute", False),
     ["top1", "gmacs"]),
    ("speedup_vs_gmacs_ratio", fig_speedup_vs_gmacs_ratio, ["speedup_median", "gmacs_ratio"]),
    ("tokens_per_layer", fig_tokens_per_layer, []),
]
FIGURES: dict[str, list[tuple[str, FigureMaker, list[str]]]] = {
    **{kind: SWEEP_FIGURES for kind in SWEEP_KINDS},
    "eval": [("top1", fig_eval_top1, ["top1"]), ("tokens_per_layer", fig_tokens_per_layer, [])],
    "robustness": [("top1_vs_masks", fig_robustness, ["top1"])],
    "similarity": [("per_layer", fig_similarity, ["layer", "mean_cos"])],
    "importance": [("share", fig_importance, ["layer", "top_p", "share"])],
    "attentiveness": [("per_layer", fig_attentiveness, ["layer", "share_became_attentive"])],
    "coherence": [("locality", fig_coherence, ["locality", "top1"])],
}


def _lacking(df: pd.DataFrame, name: str, needed: list[str]) -> list[str]:
    if name == "tokens_per_layer":
        return [] if "tokens_per_layer" in df.columns and df["tokens_per_layer"].notna().any() else ["tokens_per_layer"]
    if name == "top1_vs_masks" and missing(df, "mask_count") and missing(df, "mask_fraction"):
        return ["mask_count"] + missing(df, *needed)
    return missing(df, *needed)


def save(fig: Figure, out: Path, stem: str) -> Path:
    """Write `stem`.png (150 dpi) and `stem`.svg into `out`; returns the PNG path."""
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{stem}.png"
    fig.savefig(png, dpi=150)
    fig.savefig(out / f"{stem}.svg")
    return png


def plot_folder(folder: str | os.PathLike, out: str | os.PathLike | None = None) -> PlotOutput:
    """Every figure the CSVs of `folder` allow, written to `out` (default `folder`/plots)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    folder = Path(folder)
    out_dir = Path(out) if out is not None else folder / "plots"
    tables, notes = read_folder(folder)
    result = PlotOutput(tables=tables, notes=notes)
    for table in tables:
        pngs: list[Path] = []
        for name, make, needed in FIGURES[table.kind]:
            what = name.replace("_", " ")
            lacking = _lacking(table.df, name, needed)
            if lacking:
                result.notes.append(f"{table.path.name}: no '{what}' figure (column {', '.join(lacking)} "
                                    "missing or empty)")
                continue
            for suffix, sub in runs(table.df):
                try:
                    fig = make(sub.reset_index(drop=True))
                except (KeyError, ValueError, TypeError, IndexError) as exc:
                    result.notes.append(f"{table.path.name}: '{what}' figure failed ({type(exc).__name__}: "
                                        f"{' '.join(str(exc).split())[:100]}), skipped")
                    continue
                if fig is None:
                    result.notes.append(f"{table.path.name}{suffix}: nothing to draw for '{what}'")
                    continue
                pngs.append(save(fig, out_dir, f"{table.path.stem}_{name}{suffix}"))
        result.figures[table.path.name] = pngs
    return result
