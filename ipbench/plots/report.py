"""REPORT.md: one section per result CSV with its settings, a compact table and its figures.

The report is what a reader opens first, so each table shows only the columns that answer the
question of its CSV (short reducer labels, analyses pivoted per block as in the paper), and each
section says how the numbers were made (model, weights hash, data, images, device, versions).
Markdown tables are written here (no `tabulate` dependency).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ipbench.errors import UserError
from ipbench.plots.frames import (
    QUALIFIERS,
    SWEEP_KINDS,
    PlotOutput,
    ResultTable,
    as_percent,
    data_name,
    is_baseline,
    numeric,
    read_folder,
    row_labels,
    row_lines,
    spec_column,
    top1_bounds,
    training_note,
    with_interval,
)

if TYPE_CHECKING:
    import pandas as pd

REPORT_NAME = "REPORT.md"

QUESTIONS = {
    "sweep": "accuracy, compute and throughput per reducer and keep rate",
    "flops": "GMACs per reducer (fvcore, fused attention counted)",
    "speed": "throughput per reducer, interleaved with the baseline",
    "eval": "top-1/top-5 of single evaluations",
    "robustness": "top-1 under random 16×16 patch masks (paper Table 4)",
    "similarity": "cosine similarity of merged token pairs per block (paper Tables 6, 8)",
    "importance": "share of merged tokens among the top-p % by CLS attention (paper Table 7)",
    "attentiveness": "inattentive tokens that became attentive after re-tokenization (paper Table 5)",
    "coherence": "local coherence: locality penalty vs accuracy and pair similarity (paper Table 8)",
}


# -- markdown -----------------------------------------------------------------------------------

def _cell(value: Any, digits: int | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and digits is not None:
        return f"{value:.{digits}f}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame, digits: dict[str, int] | None = None, default_digits: int | None = None) -> str:
    """A GitHub markdown table; numbers right-aligned, floats with `digits[column]` decimals."""
    digits = digits or {}
    cols = [str(c) for c in df.columns]
    def is_num(v: Any) -> bool:
        if isinstance(v, str):  # pre-formatted numbers ("72.13"), "—" for none
            try:
                float(v)
                return True
            except ValueError:
                return v in ("", "—")
        return v is None or (isinstance(v, int | float) and not isinstance(v, bool))

    numeric_col = [bool(df[c].map(is_num).all()) and df[c].notna().any() for c in df.columns]
    rows = [[_cell(v, digits.get(str(c), default_digits)) for c, v in zip(df.columns, rec)]
            for rec in df.itertuples(index=False)]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.rjust(w) if num else v.ljust(w)
                                 for v, w, num in zip(values, widths, numeric_col)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                         for w, num in zip(widths, numeric_col)) + "|"
    return "\n".join([line(cols), sep, *(line(r) for r in rows)])


# -- settings -----------------------------------------------------------------------------------

def _uniq(df: pd.DataFrame, col: str) -> list[str]:
    if col not in df.columns:
        return []
    return [str(v) for v in dict.fromkeys(df[col].dropna()) if str(v) != ""]


def settings_lines(df: pd.DataFrame) -> list[str]:
    """How the rows were measured, one bullet per setting (several values listed)."""
    out: list[str] = []

    def add(name: str, values: list[str]) -> None:
        if values:
            out.append(f"- {name}: {', '.join(f'`{v}`' for v in values)}")

    add("model", _uniq(df, "model"))
    ckpts = _uniq(df, "checkpoint")
    shas = _uniq(df, "checkpoint_sha256")
    add("weights", [Path(c).name if not c.startswith("hub:") else c for c in ckpts])
    add("weights sha256 (first 16 hex)", shas)
    add("data", [f"{data_name(d)} ({d})" if data_name(d) != d else d for d in _uniq(df, "data")])
    add("images", [str(int(float(n))) for n in _uniq(df, "num_images")])
    devices = _uniq(df, "device")
    names = _uniq(df, "device_name")
    add("device", [f"{d} ({', '.join(names)})" if names else d for d in devices])
    for col, name in (("dtype", "dtype"), ("amp_dtype", "autocast dtype"), ("model_dtype", "model dtype"),
                      ("batch_size", "batch size"), ("threads", "CPU threads"),
                      ("repeats", "timing repeats"), ("seed", "seed")):
        add(name, _uniq(df, col))
    versions = [f"{lib} {'/'.join(_uniq(df, lib))}" for lib in ("torch", "timm", "ipbench") if _uniq(df, lib)]
    if versions:
        out.append(f"- versions: {', '.join(versions)}")
    stamps = sorted(_uniq(df, "timestamp"))
    if stamps:
        out.append(f"- measured: {stamps[0]}" + (f" … {stamps[-1]}" if len(stamps) > 1 else ""))
    note = training_note(df)
    if note:
        out.append(f"- {note}: off-the-shelf weights, no fine-tuning")
    if "random" in _uniq(df, "weights"):
        out.append("- **random weights** (timm's initialisation): accuracies are meaningless; GMACs, tokens and "
                   "speed are not")
    return out


# -- per-kind tables ----------------------------------------------------------------------------

def _label(df: pd.DataFrame) -> pd.Series:
    return row_labels(df)


def _run_cols(df: pd.DataFrame) -> dict[str, pd.Series]:
    """model / images columns, only when the CSV mixes several runs."""
    cols: dict[str, pd.Series] = {}
    if len(_uniq(df, "model")) > 1:
        cols["model"] = df["model"]
    if len(_uniq(df, "data")) > 1:
        cols["data"] = df["data"].map(lambda d: data_name(str(d)))
    if len(_uniq(df, "num_images")) > 1:
        cols["images"] = numeric(df, "num_images").astype("Int64")
    return cols


def _spread(df: pd.DataFrame, med: str, lo: str, hi: str, fmt: str) -> pd.Series:
    m, a, b = numeric(df, med), numeric(df, lo), numeric(df, hi)

    def one(x: float, y: float, z: float) -> str:
        if x != x:
            return ""
        return f"{x:{fmt}}" + (f" [{y:{fmt}}–{z:{fmt}}]" if y == y and z == z else "")

    return [one(x, y, z) for x, y, z in zip(m, a, b)]  # type: ignore[return-value]


def _sweep_table(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    import pandas as pd

    order = df.assign(_base=~df[spec_column(df)].map(is_baseline), _lab=_label(df),
                      _line=row_lines(df),
                      _k=-numeric(df, "keep_rate")).sort_values(["_base", "_line", "_k", "_lab"], kind="stable")
    cols: dict[str, Any] = {**_run_cols(order), "reducer": order["_lab"]}
    if numeric(order, "keep_rate").notna().any():
        cols["keep"] = numeric(order, "keep_rate")
    if numeric(order, "gmacs_budget").notna().any():
        cols["GMACs budget"] = numeric(order, "gmacs_budget")
    for src, name in (("final_tokens", "final tokens"), ("gmacs", "GMACs"), ("gmacs_ratio", "GMACs ratio"),
                      ("top1", "top-1 %"), ("top5", "top-5 %")):
        if numeric(order, src).notna().any():
            cols[name] = numeric(order, src).astype("Int64") if src == "final_tokens" else numeric(order, src)
    if numeric(order, "img_s_median").notna().any():
        cols["img/s median [min–max]"] = _spread(order, "img_s_median", "img_s_min", "img_s_max", ".1f")
    if numeric(order, "speedup_median").notna().any():
        cols["speed-up [min–max]"] = _spread(order, "speedup_median", "speedup_min", "speedup_max", ".2f")
    table = pd.DataFrame({k: list(v) for k, v in cols.items()})
    return table, {"keep": 3, "GMACs budget": 3, "GMACs": 3, "GMACs ratio": 2, "top-1 %": 2, "top-5 %": 2}


def _eval_table(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    import pandas as pd

    order = df.assign(_base=~df[spec_column(df)].map(is_baseline)).sort_values("_base", kind="stable")
    cols: dict[str, Any] = {**_run_cols(order), "reducer": _label(order)}
    cols["images"] = numeric(order, "num_images").astype("Int64")
    cols["final tokens"] = numeric(order, "final_tokens").astype("Int64")
    cols["top-1 %"] = numeric(order, "top1")
    cols["top-5 %"] = numeric(order, "top5")
    return pd.DataFrame({k: list(v) for k, v in cols.items()}), {"top-1 %": 2, "top-5 %": 2}


def _pivot(df: pd.DataFrame, index: list[str], column: str, col_name: str, value: pd.Series) -> pd.DataFrame:
    d = df.assign(_v=value, _c=numeric(df, column))
    d = d.dropna(subset=["_c"])
    p = d.pivot_table(index=index, columns="_c", values="_v", aggfunc="last", sort=True)
    p.columns = [col_name.format(int(c) if float(c).is_integer() else c) for c in p.columns]
    p = p.reset_index()
    if "reducer" in p.columns:  # the baseline first, as in the paper's tables
        p = p.assign(_b=~p["reducer"].map(is_baseline)).sort_values("_b", kind="stable").drop(columns="_b")
    return p.astype(object).where(p.notna(), None)


def _robustness_table(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    import pandas as pd

    df = df.assign(reducer=_label(df))
    x, name = ("mask_count", "{} masks") if numeric(df, "mask_count").notna().any() else ("mask_fraction", "{} masked")
    index = ["reducer"] + [c for c in ("placement", "fill") if c in df.columns and len(_uniq(df, c)) > 0]
    lo, hi = top1_bounds(df)
    cells = pd.Series([with_interval(v, a, b) for v, a, b in zip(numeric(df, "top1"), lo, hi)], index=df.index)
    return _pivot(df, index, x, name, cells), {}


def _layer_pivot(df: pd.DataFrame, extra: list[str], value: pd.Series) -> pd.DataFrame:
    """Rows: reducer (+ extra columns, + qualifiers with several values); columns: blocks, and
    'all blocks' where the CSV has pooled rows (layer = all)."""
    qual = [q for q in QUALIFIERS.get(_kind_of_columns(df), ()) if q not in extra and q in df.columns
            and df[q].dropna().astype(str).nunique() > 1]
    index = ["reducer", *[c for c in [*extra, *qual] if c in df.columns]]
    df = df.assign(reducer=_label(df), _v=value)
    table = _pivot(df, index, "layer", "block {}", value)
    pooled = df[df["layer"].astype(str).str.strip().str.lower() == "all"] if "layer" in df.columns else df.iloc[:0]
    if not pooled.empty:
        pooled = pooled.groupby(index, sort=False)["_v"].last().rename("all blocks").reset_index()
        table = table.merge(pooled, on=index, how="left")
        table = table.astype(object).where(table.notna(), None)
    return table


def _kind_of_columns(df: pd.DataFrame) -> str:
    for kind, cols in (("importance", "top_p"), ("attentiveness", "share_became_attentive"),
                       ("similarity", "mean_cos")):
        if cols in df.columns:
            return kind
    return ""


def _report_table(table: ResultTable) -> tuple[pd.DataFrame, dict[str, int], int | None, str]:
    """(table, decimals per column, default decimals, caption) for a CSV of any kind."""
    import pandas as pd

    df = table.df
    kind = table.kind
    if kind in SWEEP_KINDS:
        t, d = _sweep_table(df)
        return t, d, None, "img/s and speed-up: median over timed rounds with [min–max]; speed-up = paired ratio " \
                           "against the baseline measured in the same run."
    if kind == "eval":
        t, d = _eval_table(df)
        return t, d, None, ""
    if kind == "robustness":
        t, d = _robustness_table(df)
        return t, d, 2, "top-1 % per number of masked patches, with its 95 % Wilson interval [low, high]."
    if kind == "similarity":
        return (_layer_pivot(df, ["features"], numeric(df, "mean_cos")), {}, 4,
                "mean cosine similarity of the merged pairs per block (features: `metric` = what the "
                "reducer matched on, `hidden` = hidden states); blocks 0-indexed.")
    if kind == "importance":
        d = df.assign(**{"top p %": numeric(df, "top_p").map(lambda p: p * 100 if p <= 1 else p)})
        t = _layer_pivot(d, ["top p %"], as_percent(numeric(df, "share")))
        if numeric(df, "random_share").notna().any():
            rnd = d.assign(_r=as_percent(numeric(df, "random_share")), reducer=_label(d))
            on = [c for c in t.columns if c in ("reducer", "top p %", *QUALIFIERS["importance"])]
            means = rnd.groupby(on)["_r"].mean().rename("random %").reset_index()
            t = t.merge(means, on=on, how="left")
        return t, {"top p %": 0}, 2, "% of merged tokens that lie in the top p % by CLS attention; " \
                                     "`random %`: the same for random tokens; blocks 0-indexed."
    if kind == "attentiveness":
        t = _layer_pivot(df, [], as_percent(numeric(df, "share_became_attentive")))
        return t, {}, 2, "% of inattentive tokens that are attentive in the next block; blocks 0-indexed " \
                         "(the paper counts from 1: its layer 2 is block 1)."
    cols = [c for c in ("locality", "retok", "stem", "top1", "gmacs", "sim_metric", "sim_hidden") if c in df.columns]
    t = pd.DataFrame({"reducer": list(_label(df)), **{c: list(df[c]) for c in cols}})
    return t, {"top1": 2, "gmacs": 3, "sim_metric": 4, "sim_hidden": 4}, None, ""


def _existing_figures(folder: Path, stem: str) -> list[Path]:
    plots = folder / "plots"
    return sorted(plots.glob(f"{stem}_*.png")) if plots.is_dir() else []


def _rel(path: Path, folder: Path) -> str:
    try:
        return path.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def _comparison_lines(folder: Path, stem: str) -> list[str]:
    """'Which differences are real' under a sweep or eval table whose rows have per-image records."""
    import pandas as pd

    from ipbench.plots.compare import COMPARABLE, compare_folder, resolvable, shown_rows

    if stem not in COMPARABLE:
        return []
    try:
        pairs = compare_folder(folder, stem)
    except UserError:  # no records (rows of an older ipbench), or nothing to pair
        return []
    low, high = resolvable(pairs)
    return ["### Which differences are real", "", markdown_table(pd.DataFrame(shown_rows(pairs))), "",
            "Paired on the same images (`ipbench compare`): McNemar's exact test on the images where the two "
            "rows disagree; intervals: Wilson (a top-1), paired bootstrap over images (a difference). "
            f"With these images, differences of {low:.1f} to {high:.1f} points are "
            "resolvable at 80 % power.", ""]


def render_report(folder: Path, tables: list[ResultTable], notes: list[str],
                  figures: dict[str, list[Path]] | None, command: str) -> str:
    """The text of REPORT.md."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    lines = [
        "# ipbench report", "",
        f"Written by `ipbench {command}` on {now} from the CSVs in this folder. Each section is one CSV: "
        "how it was measured, its numbers, its figures. Accuracies are on the data named below, not on "
        "ImageNet-1k val unless that is the data; reducers run on off-the-shelf weights "
        "(training-free) unless stated.", "",
    ]
    if not tables:
        lines += ["No ipbench result CSV in this folder yet.", ""]
    for table in tables:
        name = table.path.name
        lines += [f"## {name} — {QUESTIONS.get(table.kind, table.kind)}", ""]
        lines += [*settings_lines(table.df), ""]
        try:
            t, digits, default, caption = _report_table(table)
            lines += [markdown_table(t, digits, default), ""]
            if caption:
                lines += [caption, ""]
        except (KeyError, ValueError, TypeError) as exc:
            lines += [f"(no table: {type(exc).__name__}: {' '.join(str(exc).split())[:100]})", ""]
        lines += _comparison_lines(folder, table.path.stem)
        pngs = figures.get(name, []) if figures is not None else _existing_figures(folder, table.path.stem)
        for png in pngs:
            lines += [f"![{png.stem}]({_rel(png, folder)})", ""]
        if not pngs and figures is None:
            lines += [f"(no figures yet: run `ipbench plot {folder}`)", ""]
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(lines)


def write_report(folder: str | os.PathLike, plotted: PlotOutput | None = None, command: str = "report") -> Path:
    """Write `folder`/REPORT.md; with `plotted`, embed its figures, else those already in plots/."""
    folder = Path(folder)
    if plotted is not None:
        tables, notes, figures = plotted.tables, plotted.notes, plotted.figures
    else:
        tables, notes = read_folder(folder)
        figures = None
    path = folder / REPORT_NAME
    path.write_text(render_report(folder, tables, notes, figures, command), encoding="utf-8")
    return path
