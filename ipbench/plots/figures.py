"""Figures of the sweep, flops, speed and eval CSVs: accuracy against cost and speed, tokens per block.

Each figure says what was measured (model, data, image count, device) in its title, has axis
units and a legend, and draws the baseline (reducer ``none``) as a reference line.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ipbench.plots.frames import (
    REDUCER_COLORS,
    Styler,
    _base_name,
    _title,
    _values,
    hardware_summary,
    has_values,
    is_baseline,
    numeric,
    rate_text,
    row_labels,
    row_lines,
    spec_column,
    top1_bounds,
)

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


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
    return row_lines(df)


def _fmt_tokens(v: float) -> str:
    return str(int(v)) if v == v else "?"


def top1_error_bars(df: pd.DataFrame) -> list[pd.Series] | None:
    """Vertical bars: the 95 % interval of each top-1 (`top1_bounds`; None where no row has one)."""
    lo, hi = top1_bounds(df)
    if lo.isna().all():
        return None
    return [(df["_y"] - lo).clip(lower=0).fillna(0), (hi - df["_y"]).clip(lower=0).fillna(0)]


def fig_accuracy_vs(df: pd.DataFrame, x: str, xlabel: str, what: str, hardware: bool) -> Figure | None:
    """Top-1 against a cost or speed column, one line per reducer, the baseline as reference."""
    if not has_values(df, "top1", x):
        return None
    fig, (ax,) = _new()
    styler = Styler()
    df = df.assign(_x=numeric(df, x), _y=numeric(df, "top1"), _label=_line_label(df), _full=row_labels(df))
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
        ax.errorbar(sub["_x"], sub["_y"], xerr=xerr, yerr=top1_error_bars(sub), label=str(label), capsize=2,
                    markersize=5, **st)
        for xv, yv, full, line in zip(sub["_x"], sub["_y"], sub["_full"], sub["_label"]):
            rate = rate_text(full, line).replace("keep=", "")  # '0.7', or ToMe's 'r=13'
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
    ax.text(0.99, 0.01, "point labels: keep rate (ToMe: r); bars: 95 % Wilson interval", transform=ax.transAxes,
            ha="right", va="bottom",
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
        return [float(t) for t in str(row.get("tokens_per_layer", "")).split()]
    except ValueError:
        return []


def fig_tokens_per_layer(df: pd.DataFrame) -> Figure | None:
    """Tokens after each block: one panel per reducer, one line per setting (keep rate)."""
    import matplotlib as mpl

    if "tokens_per_layer" not in df.columns:
        return None
    df = df.assign(_tok=df.apply(_tokens, axis=1), _label=_line_label(df), _full=row_labels(df))
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
            name = rate_text(row["_full"], row["_label"]) or row["_full"]
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
    df = df.assign(_y=numeric(df, "top1"), _label=row_labels(df)).dropna(subset=["_y"])
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


def fig_sensitivity(df: pd.DataFrame) -> Figure | None:
    """Top-1 of every reducer as the patch size varies (left) and as the resolution varies (right),
    each variant against its own baseline (`ipbench sensitivity`)."""
    if not has_values(df, "top1", "patch_size", "img_size"):
        return None
    df = df.assign(_y=numeric(df, "top1"), _label=df.get("reducer_line", row_labels(df)))
    axes_of = [(a, x, t) for a, x, t in (("patch", "patch_size", "patch size (px, at the model's resolution)"),
                                         ("resolution", "img_size", "resolution (px, at the model's patch size)"))
               if (df["axis"] == a).any()]
    if not axes_of:
        return None
    fig, axes = _new(ncols=len(axes_of), width=5.2)
    styler = Styler()
    for ax, (axis, column, title) in zip(axes, axes_of):
        part = df[df["axis"] == axis]
        for name, g in part.groupby("_label", sort=False):
            g = g.sort_values(column)
            ax.plot(numeric(g, column), g["_y"], label=str(name), markersize=5, **styler(str(name)))
        ax.set_xlabel(title)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_xticks(sorted(numeric(part, column).dropna().unique()))
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8)
    _title(fig, "Sensitivity to patch size and resolution (same weights, embeddings resampled)", df)
    return fig


def fig_finetune(df: pd.DataFrame) -> Figure | None:
    """A fine-tune's curves (`ipbench finetune`): training loss and learning rate against the step,
    validation top-1 of the weights and their EMA against the epoch, and the conv stem's fit."""
    train = df[df["kind"] == "train"]
    if train.empty or not has_values(train, "loss"):
        return None
    val = df[df["kind"] == "val"]
    stem = df[df["kind"] == "stem"]
    panels = 2 + (not stem.empty)
    fig, axes = _new(ncols=panels, width=4.8)
    styler = Styler()
    labels = df["reducer_label"].astype(str) + df["stem"].map(lambda s: " (conv stem)" if s == "conv" else "")
    df = df.assign(_label=labels)
    lr_ax = axes[0].twinx()
    for _, g in df.groupby("config_key", sort=False):
        name = str(g["_label"].iloc[0])
        style = styler(name)
        t = g[g["kind"] == "train"].sort_values("step")
        axes[0].plot(numeric(t, "step"), numeric(t, "loss"), label=name, markersize=3, **style)
        lr_ax.plot(numeric(t, "step"), numeric(t, "lr"), color=style.get("color"), alpha=0.35, linewidth=1)
        v = g[g["kind"] == "val"].sort_values("step")
        if not v.empty and has_values(v, "top1"):
            epochs = numeric(v, "epoch") + 1
            axes[1].plot(epochs, numeric(v, "top1"), label=f"{name}", markersize=4, **style)
            if has_values(v, "top1_ema"):
                axes[1].plot(epochs, numeric(v, "top1_ema"), label=f"{name} EMA", linestyle="--",
                             color=style.get("color"), marker="x")
        s = g[g["kind"] == "stem"].sort_values("step")
        if not s.empty:
            axes[2].plot(numeric(s, "step"), numeric(s, "loss"), label=name, markersize=3, **style)
    axes[0].set_xlabel("optimizer step")
    axes[0].set_ylabel("training loss (interval mean)")
    lr_ax.set_ylabel("learning rate (faint)")
    axes[0].legend(fontsize=8)
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("validation top-1 (%)")
    if not val.empty:
        axes[1].legend(fontsize=8)
    if panels == 3:
        axes[2].set_xlabel("stem fit step")
        axes[2].set_ylabel("relative error vs the patch projection")
        axes[2].legend(fontsize=8)
    _title(fig, "Fine-tuning with the reducer in place", df)
    return fig
