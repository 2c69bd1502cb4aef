"""Figures of the analysis CSVs: the paper's Tables 4 to 8 as curves and bars."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ipbench.plots.figures import _baseline_rows, _new, top1_error_bars
from ipbench.plots.frames import (
    QUALIFIERS,
    Styler,
    _title,
    as_percent,
    has_values,
    is_baseline,
    numeric,
    qualified_label,
    row_labels,
)

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure


def _baseline_value(df: pd.DataFrame, y: str) -> float | None:
    base = _baseline_rows(df)
    vals = numeric(base, y).dropna()
    return float(vals.iloc[-1]) if len(vals) else None


DODGE = 0.008  # horizontal shift between the lines of a figure with interval bars, per line, of the x range


def fig_robustness(df: pd.DataFrame) -> Figure | None:
    """Top-1 against the number (or fraction) of masked patches, per reducer (paper Table 4)."""
    x = "mask_count" if has_values(df, "mask_count") else "mask_fraction"
    if not has_values(df, x, "top1"):
        return None
    settings_cols = [c for c in ("placement", "fill") if c in df.columns]
    df = df.assign(_x=numeric(df, x), _y=numeric(df, "top1"), _label=row_labels(df))
    settings = list(df.groupby(settings_cols, sort=True, dropna=False)) if settings_cols else [("", df)]
    fig, axes = _new(ncols=len(settings), width=6.0)
    for ax, (key, sub) in zip(axes, settings):
        styler = Styler()
        lines = list(sub.dropna(subset=["_x", "_y"]).groupby("_label", sort=True))
        span = float(sub["_x"].max() - sub["_x"].min()) or 1.0
        for i, (label, line) in enumerate(lines):
            line = line.sort_values("_x")
            st = styler(str(label))
            if is_baseline(label):
                st = {**st, "color": "black", "linestyle": "--"}
            dodge = DODGE * span * (i - (len(lines) - 1) / 2)  # the lines' interval bars side by side
            ax.errorbar(line["_x"] + dodge, line["_y"], yerr=top1_error_bars(line), label=str(label), capsize=2,
                        markersize=5, **st)
        where = ", ".join(f"{c} {v}" for c, v in zip(settings_cols, key if isinstance(key, tuple) else (key,)))
        ax.set_title(f"masks: {where}" if where else "", fontsize=9)
        ax.set_xlabel("masked 16×16 patches per image" if x == "mask_count" else "fraction of patches masked")
        ax.set_ylabel("top-1 accuracy (%), bars: 95 % interval")
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
