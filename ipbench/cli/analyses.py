"""The paper's analyses as commands: robustness, similarity, importance, attentiveness, coherence.

Each command checks its own options, runs its analysis (ipbench.runs.analyses) and prints the
paper-shaped table; the shared run options are declared once (`run_options`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ipbench.cli.app import app, handle_errors
from ipbench.cli.display import Display, label, paper_console, paper_table
from ipbench.cli.options import ForceOpt, OutOpt, policies, run_options
from ipbench.plots.frames import interval_cell

if TYPE_CHECKING:
    from ipbench.runs.analyses.common import Outcome
    from ipbench.runs.context import RunSpec

AnalysisReducersOpt = Annotated[list[str] | None, typer.Option(
    "--reducers", "-r",
    help="Reducer specs separated by commas (or the option repeated), e.g. 'tome:r=13,evit,imagepiece'; "
         "a piece with '=' continues the spec before it. Default: see the command's help.")]


def _done(outcome: Outcome, print_table: Any) -> None:
    """The paper-shaped table, the notes, and what was measured or resumed."""
    if outcome.rows:
        print_table(outcome)
    for note in outcome.notes:
        typer.echo(f"note: {note}")
    what = (f"{outcome.measured} row(s) measured" if outcome.measured
            else "nothing new measured (use --force to measure again)")
    resumed = f", {outcome.resumed} already in the CSV" if outcome.resumed else ""
    typer.echo(f"{what}{resumed}; rows in {outcome.csv_path}")


def _where(outcome: Outcome) -> tuple[str, str]:
    """(model name, 'N images of PATH') of an outcome's run."""
    assert outcome.run is not None
    ctx = outcome.run.ctx
    return ctx.model, f"{outcome.run.num_images} images of {ctx.source.path}"


def _training_free(model: str) -> str:
    return (f"training-free: reducers applied to off-the-shelf weights of {model}; the paper's numbers come from "
            "models trained with each method")


@app.command("robustness")
@handle_errors
@run_options()
def robustness_cmd(
    run: RunSpec,
    mask: Annotated[float | None, typer.Option(
        "--mask", help="Mask this fraction of the patches, in (0, 1] (0.3 = 59 of 196), instead of --masks.")] = None,
    masks: Annotated[str | None, typer.Option(
        "--masks", help="Numbers of 16x16 masks per image, comma separated (default: the paper's "
                        "7,10,15,20,25,50).")] = None,
    placement: Annotated[str, typer.Option(
        "--placement", help="patch: squares on the patch grid at distinct random cells (a count of k masks "
                            "exactly k patches); free: anywhere, may overlap.")] = "patch",
    fill: Annotated[str, typer.Option(
        "--fill", help="Masked pixels: zero (0 in normalised space, the dataset's mean colour), mean (the "
                       "image's channel means) or noise (N(0,1) in normalised space).")] = "zero",
    reducers: AnalysisReducersOpt = None,
    seed: Annotated[int, typer.Option(
        "--seed", help="Mask seed: image i gets its own generator from (seed, i), so every reducer sees the "
                       "same masked images.")] = 0,
    out: OutOpt = Path("results"),
    force: ForceOpt = False,
) -> None:
    """Top-1 under random 16x16 masks (paper Table 4), baseline and each reducer.

    Default reducers: tome:r=13, evit, imagepiece (the baseline is always measured). Appends one row per
    reducer and mask count to OUT/robustness.csv; rows already there are skipped.
    """
    from ipbench.runs.analyses import robustness

    counts = robustness.check_options(masks, mask, placement, fill)
    chosen = policies(reducers, robustness.DEFAULT_REDUCERS)
    with Display() as d:
        outcome = robustness.run(run, out, chosen, counts, mask, placement, fill, force, d)
    _done(outcome, _robustness_table)


def _robustness_table(out: Outcome) -> None:
    """Paper Table 4's shape: one row per model/reducer, one column per mask count (top-1 %)."""
    model, where = _where(out)
    counts = list(dict.fromkeys(int(r["mask_count"]) for r in out.rows))
    fractions = {int(r["mask_count"]): float(r["mask_fraction"]) for r in out.rows}
    r0 = out.rows[0]
    caption = (f"top-1 % [95 % interval] on {where}; random 16x16 masks, placement {r0['placement']}, "
               f"fill {r0['fill']}, "
               f"seed {r0['seed']} (same masked images for every row).\n" + _training_free(model))
    t = paper_table(f"robustness: {model} (paper Table 4)",
                    ["reducer", "final tokens", *[f"{c} masks ({100 * fractions[c]:.0f}%)" for c in counts]], caption)
    by_spec: dict[str, dict[int, Any]] = {}
    rows: dict[str, dict[str, Any]] = {}
    for r in out.rows:
        by_spec.setdefault(r["reducer_spec"], {})[int(r["mask_count"])] = r
        rows[r["reducer_spec"]] = r
    for spec, cells in by_spec.items():
        name = f"{model} (no reduction)" if spec == "none" else label(rows[spec])
        t.add_row(name, str(rows[spec]["final_tokens"]), *[interval_cell(cells.get(c, {})) for c in counts])
    paper_console().print(t)


@app.command("similarity")
@handle_errors
@run_options()
def similarity_cmd(run: RunSpec, reducers: AnalysisReducersOpt = None, out: OutOpt = Path("results"),
                   force: ForceOpt = False) -> None:
    """Cosine similarity of the merged token pairs per block (paper Tables 6 and 8).

    On the reducer's matching metric and on the hidden states. Default reducers: tome:r=13, imagepiece,
    mstm; a reducer that only prunes is skipped with a note. Appends to OUT/similarity.csv.
    """
    from ipbench.runs.analyses import similarity

    chosen = policies(reducers, similarity.DEFAULT_REDUCERS)
    with Display() as d:
        outcome = similarity.run(run, out, chosen, force, d)
    _done(outcome, _similarity_table)


def _similarity_table(out: Outcome) -> None:
    """Paper Table 6's shape: mean cosine of merged pairs in the first and last merging block."""
    model, where = _where(out)
    t = paper_table(
        f"similarity: merged pairs, {model} (paper Tables 6, 8)",
        ["reducer", "features", "first block", "last block", "all blocks", "pairs"],
        f"mean cosine similarity of the merged pairs on {where}; features: metric = what the reducer matched on "
        "(head-mean keys by default), hidden = hidden states; blocks 0-indexed.\n" + _training_free(model))
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in out.rows:
        groups.setdefault((r["reducer_spec"], r["features"]), []).append(r)
    for (_, feat), rows in groups.items():
        per_layer = {int(r["layer"]): r for r in rows if str(r["layer"]) != "all"}
        pooled = next((r for r in rows if str(r["layer"]) == "all"), None)
        if not per_layer or pooled is None:
            continue
        first, last = per_layer[min(per_layer)], per_layer[max(per_layer)]
        pruned = " (pruned pairs)" if rows[0]["pairs"] == "pruned" else ""
        t.add_row(label(rows[0]) + pruned, f"{feat} ({rows[0]['metric']})",
                  f"{float(first['mean_cos']):.4f} (block {first['layer']})",
                  f"{float(last['mean_cos']):.4f} (block {last['layer']})",
                  f"{float(pooled['mean_cos']):.4f}", str(pooled["n_pairs"]))
    paper_console().print(t)


@app.command("importance")
@handle_errors
@run_options()
def importance_cmd(
    run: RunSpec,
    top: Annotated[str, typer.Option(
        "--top", help="Top-p sets by CLS attention, in percent, comma separated (the paper's 30,20,15,70).")]
    = "30,20,15,70",
    tokens: Annotated[str, typer.Option(
        "--tokens", help="Which merged tokens count: src (the tokens merged away, ToMe's set A) or both "
                         "(and their destinations).")] = "src",
    reducers: AnalysisReducersOpt = None,
    out: OutOpt = Path("results"),
    force: ForceOpt = False,
) -> None:
    """Share of merged tokens in the top-p % by CLS attention, beside random choice (paper Table 7).

    Per block (the paper shows the first). Default reducers: tome:r=13, imagepiece, mstm; a reducer that
    only prunes is skipped with a note. Appends to OUT/importance.csv.
    """
    from ipbench.errors import UserError
    from ipbench.runs.analyses import importance

    tops = importance.parse_top(top)
    if tokens not in importance.TOKENS:
        raise UserError(f"unknown --tokens {tokens!r}; valid: {', '.join(importance.TOKENS)}")
    chosen = policies(reducers, importance.DEFAULT_REDUCERS)
    with Display() as d:
        outcome = importance.run(run, out, chosen, tops, tokens, force, d)
    _done(outcome, _importance_table)


def _importance_table(out: Outcome) -> None:
    """Paper Table 7's shape: % of merged tokens in the top p % (first block, and all blocks)."""
    model, where = _where(out)
    tops = list(dict.fromkeys(float(r["top_p"]) for r in out.rows))
    tokens = out.rows[0]["tokens"] if out.rows else "src"
    t = paper_table(
        f"importance: merged tokens among the most attended, {model} (paper Table 7)",
        ["reducer", "blocks", *[f"top {100 * p:g} %" for p in tops], "merged tokens"],
        f"% of the merged tokens ({'tokens merged away' if tokens == 'src' else 'both tokens of a pair'}) that lie "
        f"in the top p % by CLS attention of their block; in parentheses: the same for tokens chosen at random. "
        f"{where}; blocks 0-indexed.\n" + _training_free(model))
    groups: dict[str, dict[tuple[str, float], dict[str, Any]]] = {}
    for r in out.rows:
        groups.setdefault(r["reducer_spec"], {})[(str(r["layer"]), float(r["top_p"]))] = r
    for cells in groups.values():
        layers = sorted({int(layer) for layer, _ in cells if layer != "all"})
        if not layers:
            continue
        name = label(next(iter(cells.values())))
        for scope, what in ((str(layers[0]), f"first (block {layers[0]})"), ("all", "all")):
            row = [name if scope != "all" else "", what]
            for p in tops:
                c = cells.get((scope, p))
                row.append("-" if c is None or c["share"] == "" else
                           f"{100 * float(c['share']):.2f} ({100 * float(c['random_share']):.1f})")
            c0 = cells.get((scope, tops[0]))
            row.append(str(c0["n_merged"]) if c0 else "-")
            t.add_row(*row)
    paper_console().print(t)


@app.command("attentiveness")
@handle_errors
@run_options()
def attentiveness_cmd(
    run: RunSpec,
    attentive: Annotated[float | None, typer.Option(
        "--attentive", help="ρ: a token is attentive when inside the top ρ fraction by CLS attention of its "
                            "block (default: the reducer's keep rate; 0.7 for reducers without one).")] = None,
    population: Annotated[str, typer.Option(
        "--population", help="merged: the inattentive tokens that took part in a merge (re-tokenized); "
                             "inattentive: all inattentive tokens.")] = "merged",
    score: Annotated[str, typer.Option(
        "--score", help="what ranks tokens as attentive: token (the CLS attention a token draws) or patch (that "
                        "attention divided by the patches it holds, so a merged token does not count as attentive "
                        "for the log(size) boost proportional attention gives it).")] = "patch",
    reducers: AnalysisReducersOpt = None,
    out: OutOpt = Path("results"),
    force: ForceOpt = False,
) -> None:
    """Share of inattentive tokens that are attentive in the next block after merging (paper Table 5).

    Per merging block. Default reducers: imagepiece, tome:r=13, mstm. Appends to OUT/attentiveness.csv.
    """
    from ipbench.runs.analyses import attentiveness

    attentiveness.check_options(attentive, population, score)
    chosen = policies(reducers, attentiveness.DEFAULT_REDUCERS)
    with Display() as d:
        outcome = attentiveness.run(run, out, chosen, attentive, population, force, d, score)
    _done(outcome, _attentiveness_table)


def _attentiveness_table(out: Outcome) -> None:
    """Paper Table 5's shape: one column per re-tokenize block, % that became attentive."""
    model, where = _where(out)
    layers = sorted({int(r["layer"]) for r in out.rows if str(r["layer"]) != "all"})
    population = out.rows[0]["population"] if out.rows else "merged"
    score = out.rows[0].get("score") if out.rows else "patch"
    ranked = "CLS attention per patch" if score == "patch" else "CLS attention"
    t = paper_table(
        f"attentiveness: inattentive -> attentive in the next block, {model} (paper Table 5)",
        ["reducer", "ρ", *[f"block {layer}" for layer in layers], "all"],
        f"% of the inattentive tokens ({'that took part in a merge' if population == 'merged' else 'all'}) of a "
        f"block whose patches are in an attentive token (top ρ by {ranked}) in the next block; {where}; "
        "blocks 0-indexed (the paper's layer 2 is block 1).\n" + _training_free(model))
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for r in out.rows:
        groups.setdefault(r["reducer_spec"], {})[str(r["layer"])] = r

    def pct(c: dict[str, Any] | None) -> str:
        return "-" if c is None or c["share_became_attentive"] == "" else \
            f"{100 * float(c['share_became_attentive']):.2f}"

    for cells in groups.values():
        first = next(iter(cells.values()))
        t.add_row(label(first), f"{float(first['attentive_rate']):g}",
                  *[pct(cells.get(str(layer))) for layer in layers], pct(cells.get("all")))
    paper_console().print(t)


@app.command("coherence")
@handle_errors
@run_options()
def coherence_cmd(
    run: RunSpec,
    localities: Annotated[str, typer.Option(
        "--localities", help="λ values of ImagePiece's training-free locality penalty, comma separated "
                             "(0 = off).")] = "0,0.5,1,2",
    prune: Annotated[bool, typer.Option(
        "--prune/--no-prune", help="Also run the retok=prune control (same schedule, pairs dropped).")] = True,
    stem_checkpoint: Annotated[str | None, typer.Option(
        "--stem-checkpoint", help="Weights trained with ImagePiece's conv stem (patch_embed.proj.body.*): adds "
                                  "a stem=conv row on them.")] = None,
    reducers: Annotated[list[str] | None, typer.Option(
        "--reducers", "-r", help="ImagePiece specs to vary (each needs an imagepiece part), comma separated; "
                                 "default 'imagepiece'.")] = None,
    out: OutOpt = Path("results"),
    force: ForceOpt = False,
) -> None:
    """ImagePiece's local-coherence ablation (paper Table 8): locality off vs on, prune control, conv stem.

    Per variant: top-1, GMACs and the mean cosine of the merged pairs. Appends to OUT/coherence.csv.
    """
    from ipbench.runs.analyses import coherence

    lams = coherence.parse_localities(localities)
    bases, skipped = coherence.applicable(policies(reducers, coherence.DEFAULT_REDUCERS))
    with Display() as d:
        outcome = coherence.run(run, out, bases, lams, prune, stem_checkpoint, force, d)
    outcome.notes[:0] = skipped
    _done(outcome, _coherence_table)


def _coherence_table(out: Outcome) -> None:
    """Paper Table 8's shape: tokenizer / locality → merged-pair similarity and accuracy."""
    from ipbench.reducers import parse_spec
    from ipbench.runs.analyses.coherence import with_params

    model, where = _where(out)
    t = paper_table(
        f"coherence: ImagePiece local-coherence ablation, {model} (paper Table 8)",
        ["imagepiece", "locality λ", "retok", "stem", "top-1 %", "GMACs", "sim metric (first block)",
         "sim metric (all)", "sim hidden (all)"],
        "sim: mean cosine of the merged pairs (retok=prune: of the pairs that were dropped instead) on the matching "
        f"metric and on hidden states. {where}.\n" + _training_free(model)
        + ("; the stem=conv rows run the --stem-checkpoint, trained with the stem (not training-free)"
           if any(str(r.get("stem")) == "conv" for r in out.rows) else ""))

    def num(r: dict[str, Any], col: str, fmt: str) -> str:
        return "-" if r.get(col, "") == "" else format(float(r[col]), fmt)

    for r in out.rows:
        base = with_params(parse_spec(r["reducer_spec"]), locality=0.0, retok="merge", stem="patch").label()
        t.add_row(base, f"{float(r['locality']):g}", str(r["retok"]), str(r["stem"]), num(r, "top1", ".2f"),
                  num(r, "gmacs", ".4f"), num(r, "sim_metric_first", ".4f"), num(r, "sim_metric", ".4f"),
                  num(r, "sim_hidden", ".4f"))
    paper_console().print(t)
