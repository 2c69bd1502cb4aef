"""`ipbench plot`: every figure the CSVs of a folder allow, as PNG and SVG.

A missing, empty or unknown CSV, or a column a figure needs but the file lacks, skips that figure
with a note instead of failing. Figures go to ``<folder>/plots/<name>.png`` and ``.svg``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ipbench.plots.analyses import fig_attentiveness, fig_coherence, fig_importance, fig_robustness, fig_similarity
from ipbench.plots.figures import (
    fig_accuracy_vs,
    fig_eval_top1,
    fig_finetune,
    fig_sensitivity,
    fig_speedup_vs_gmacs_ratio,
    fig_tokens_per_layer,
)
from ipbench.plots.frames import SWEEP_KINDS, PlotOutput, missing, read_folder, runs

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure


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
    "sensitivity": [("top1", fig_sensitivity, ["top1", "patch_size", "img_size"])],
    "finetune": [("curves", fig_finetune, ["step", "loss"])],
}


def _lacking(df: pd.DataFrame, name: str, needed: list[str]) -> list[str]:
    if name == "tokens_per_layer":
        return [] if "tokens_per_layer" in df.columns and df["tokens_per_layer"].notna().any() else ["tokens_per_layer"]
    if name == "top1_vs_masks" and missing(df, "mask_count") and missing(df, "mask_fraction"):
        return ["mask_count"] + missing(df, *needed)
    return missing(df, *needed)


FORMATS = ("png", "svg")  # PNG for REPORT.md and a quick look, SVG for papers


def save(fig: Figure, out: Path, stem: str, formats: tuple[str, ...] = FORMATS) -> Path:
    """Write `stem`.png (150 dpi, always: REPORT.md shows it) and the other `formats` into `out`;
    returns the PNG path."""
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{stem}.png"
    fig.savefig(png, dpi=150)
    for fmt in formats:
        if fmt != "png":
            fig.savefig(out / f"{stem}.{fmt}")
    return png


def plot_folder(folder: str | os.PathLike, out: str | os.PathLike | None = None,
                formats: tuple[str, ...] = FORMATS) -> PlotOutput:
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
                pngs.append(save(fig, out_dir, f"{table.path.stem}_{name}{suffix}", formats))
        result.figures[table.path.name] = pngs
    return result
