"""The commands that read results or draw: plot, report, visualize (torch only for visualize)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ipbench.cli import display
from ipbench.cli.app import app, handle_errors
from ipbench.cli.options import run_options
from ipbench.errors import UserError

if TYPE_CHECKING:
    from ipbench.runs.context import RunSpec

FIGURE_FORMATS = ("png", "svg", "pdf")
NOTHING_PLOTTED = 3  # plot's exit code when no figure could be drawn (2 stays a bad input)
ResultsArg = Annotated[Path, typer.Argument(
    help="Folder holding the result CSVs (sweep.csv, eval.csv, robustness.csv, ...).")]


def results_folder(folder: Path) -> Path:
    """A folder of result CSVs that figures and REPORT.md will be written into (so it must be writable)."""
    from ipbench.results import prepare_out

    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder (give the folder the result CSVs were written to)")
    return prepare_out(folder, "folder")


@app.command("plot")
@handle_errors
def plot_cmd(
    folder: ResultsArg = Path("results"),
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Folder for the figures (default: FOLDER/plots).")] = None,
    formats: Annotated[str, typer.Option(
        "--format", help="Figure formats, comma separated: png (always written: REPORT.md shows it), svg, pdf.")]
    = "png,svg",
) -> None:
    """Figures (PNG + SVG) and FOLDER/REPORT.md from every ipbench CSV in a folder.

    A missing or empty CSV, or a column a figure needs, skips that figure with a note. Exit code 3
    when no figure at all could be drawn (a script can tell it from success, 0, and bad input, 2).
    """
    from ipbench.plots import plot_folder, write_report
    from ipbench.results import prepare_out

    chosen = tuple(dict.fromkeys(f.strip().lower() for f in formats.split(",") if f.strip()))
    bad = [f for f in chosen if f not in FIGURE_FORMATS]
    if bad or not chosen:
        raise UserError(f"--format {formats!r}: valid formats are {', '.join(FIGURE_FORMATS)}")
    results_folder(folder)
    if out is not None:
        prepare_out(out)
    done = plot_folder(folder, out, chosen)
    for name, pngs in done.figures.items():
        for png in pngs:
            typer.echo(f"{name}: {png}")
    for note in done.notes:
        typer.echo(f"note: {note}")
    if done.tables:
        typer.echo(f"report: {write_report(folder, done, command='plot')}")
    if not done.figures:
        what = "no figure could be drawn from its CSVs" if done.tables else "no ipbench result CSV with rows"
        typer.echo(f"nothing plotted: {what} in {folder}", err=True)
        raise typer.Exit(NOTHING_PLOTTED)


@app.command("report")
@handle_errors
def report_cmd(folder: ResultsArg = Path("results")) -> None:
    """Write FOLDER/REPORT.md (settings, tables, existing figures) without redrawing the figures."""
    from ipbench.plots import write_report

    typer.echo(f"report: {write_report(results_folder(folder))}")


@app.command("visualize")
@handle_errors
@run_options(exclude=("data", "limit", "skip_bad", "batch_size", "workers", "threads", "seed"))
def visualize_cmd(
    run: RunSpec,
    image: Annotated[Path, typer.Option(
        "--image", "-i", help="The image file (any format PIL reads); it gets the model's eval crop.")],
    reducer: Annotated[str, typer.Option(
        "--reducer", help="Token reducer spec whose token groups are drawn, e.g. 'imagepiece' or 'tome:r=13'.")],
    layer: Annotated[str | None, typer.Option(
        "--layer", help="Block(s) after which the groups are drawn, 0-indexed: 11, -1, 2,5,8,11 or 'all' "
                        "(default: the last block).")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="PNG file to write (default: results/tokens_<image name>.png).")] = None,
) -> None:
    """Draw the token groups of a reducer over an image (each merged token one colour, discarded patches grey).

    Traces one forward pass: after the chosen block, every token's source patches.
    """
    from ipbench.plots.tokens import png_path, save_groups
    from ipbench.reducers import parse_spec
    from ipbench.results import prepare_out
    from ipbench.runs.visualize import token_groups

    policy = parse_spec(reducer)  # bad input fails before the model loads
    png = png_path(out, image)
    prepare_out(png.parent)
    groups = token_groups(run, image, policy, layer)
    typer.echo(f"figure: {save_groups(groups.image, groups.layouts, groups.patch, groups.title, png)}")


@app.command("compare")
@handle_errors
def compare_cmd(
    folder: ResultsArg = Path("results"),
    a: Annotated[str | None, typer.Option("--a", help="Row A: a reducer label or spec (e.g. 'tome:r=8').")] = None,
    b: Annotated[str | None, typer.Option("--b", help="Row B, compared with A on the same images.")] = None,
    source: Annotated[str, typer.Option("--from", help="The CSV whose rows are compared: sweep or eval.")] = "sweep",
) -> None:
    """Which differences are real: paired comparisons of rows measured on the same images.

    From the per-image records (FOLDER/predictions/): McNemar's exact test on the images where the two
    disagree, a paired bootstrap interval of the top-1 difference, Wilson intervals of each top-1, and
    the smallest difference this data resolves (80 % power). Without --a/--b: every reducer against the
    baseline, and every two reducers at the same keep rate. Writes FOLDER/compare.csv.
    """
    import pandas as pd

    from ipbench.plots.compare import compare_folder, pair_record

    pairs = compare_folder(folder, source, a, b)
    display.print_comparisons(pairs, f"compare: {source}.csv of {folder}")
    records = [pair_record(p) for p in pairs]
    path = folder / "compare.csv"
    pd.DataFrame(records).to_csv(path, index=False)
    typer.echo(f"{len(records)} comparison(s) written to {path}")
