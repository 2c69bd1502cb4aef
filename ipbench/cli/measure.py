"""The measuring commands: eval, sweep, flops, speed. Each parses its options, calls one run, prints."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ipbench.cli.app import app, handle_errors, main_rank
from ipbench.cli.options import (
    ForceOpt,
    OutOpt,
    ReducersOpt,
    parse_budgets,
    parse_keep_rates,
    parse_tome_r,
    policies,
    run_options,
)
from ipbench.errors import UserError

if TYPE_CHECKING:
    from ipbench.measure.throughput import SpeedProtocol
    from ipbench.runs.context import RunSpec

ReducerOpt = Annotated[str, typer.Option(
    "--reducer", help="Token reducer spec, e.g. 'evit:keep=0.7' or 'tome:r=13'; 'none' is plain timm.")]
RepeatsOpt = Annotated[int, typer.Option(
    "--repeats", min=1, help="Timed rounds; each round times every model once, interleaved.")]
MinSecondsOpt = Annotated[float, typer.Option(
    "--min-seconds", min=0.0, help="Each timing repeats the forward pass for at least this long.")]
WarmupOpt = Annotated[int, typer.Option("--warmup", min=1, help="Untimed forward passes per model first.")]
CompileOpt = Annotated[bool, typer.Option(
    "--compile", help="torch.compile every model before timing (the warm-up compiles).")]
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
CompileModeOpt = Annotated[str, typer.Option(
    "--compile-mode", help=f"torch.compile's mode with --compile: {', '.join(COMPILE_MODES)}.")]
SpeedGroupOpt = Annotated[int, typer.Option(
    "--speed-group", min=0,
    help="Reducers timed per interleaved group with the baseline (each group its own rounds); small "
         "groups pair every reducer with a baseline timing close in time. 0 = all in one group.")]


def _protocol(batch_size: int, repeats: int, min_seconds: float, warmup: int, compile_: bool,
              group: int, compile_mode: str = "default") -> SpeedProtocol:
    from ipbench.measure.throughput import SpeedProtocol

    if compile_mode not in COMPILE_MODES:
        raise UserError(f"unknown --compile-mode {compile_mode!r}; valid: {', '.join(COMPILE_MODES)}")
    return SpeedProtocol(batch_size=batch_size, repeats=repeats, min_seconds=min_seconds, warmup=warmup,
                         compile=compile_, group=group, compile_mode=compile_mode)


@app.command("eval")
@handle_errors
@run_options()
def eval_cmd(run: RunSpec, reducer: ReducerOpt = "none", out: OutOpt = Path("results")) -> None:
    """Top-1/top-5 of one model (optionally with a token reducer) on a data source.

    Any timm classifier works without a reducer (--model resnet18); a reducer needs a timm ViT.
    Prints a table and appends one row to OUT/eval.csv (columns: see the README).
    """
    from rich.table import Table

    from ipbench.cli.display import Display, wide_console
    from ipbench.reducers import parse_spec
    from ipbench.runs.eval import run_eval

    policy = parse_spec(reducer)
    with Display() as d:
        outcome = run_eval(run, policy, out, d)
    res, row = outcome.result, outcome.row

    def pct(value: float | None, correct: int) -> str:
        return "n/a" if value is None else f"{value:.1f} ({correct}/{res.total})"

    caption = "accuracy n/a: synthetic images have no labels" if not outcome.ctx.source.has_labels else None
    table = Table(title=f"eval: {outcome.ctx.model} on {outcome.ctx.source.path}",
                  caption="\n".join(n for n in [caption, *outcome.notes] if n) or None)
    table.add_column("reducer", overflow="fold")
    for col in ("images", "final tokens", "top-1 %", "top-5 %", "img/s"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_row(row["reducer_label"], str(res.images), str(row["final_tokens"] or "–"), pct(res.top1, res.correct1),
                  pct(res.top5, res.correct5), f"{res.images / outcome.seconds:.1f}" if outcome.seconds > 0 else "-")
    console = wide_console()
    console.print(table)
    skipped = outcome.ctx.source.skipped
    if skipped:
        typer.echo(f"skipped {len(skipped)} unreadable image(s); first: {skipped[0]}", err=True)
    for note in outcome.notes:
        typer.echo(f"note: {note}", err=True)
    console.print(f"row appended to {outcome.csv_path}", soft_wrap=True)


@app.command("sweep")
@handle_errors
@run_options()
def sweep_cmd(
    run: RunSpec,
    reducers: ReducersOpt = None,
    keep_rates: Annotated[str | None, typer.Option(
        "--keep-rates", help="Keep rates ρ in (0, 1], comma separated (default 0.9,0.8,0.7,0.6,0.5). "
                             "evit/topk/imagepiece/mstm get keep=ρ; ToMe the r closest to EViT's GMACs at ρ.")] = None,
    tome_r: Annotated[str | None, typer.Option(
        "--tome-r", help="Run ToMe at these r values (e.g. 8,13,16) instead of mapping each keep rate to r.")] = None,
    match_gmacs: Annotated[str | None, typer.Option(
        "--match-gmacs", help="Calibrate every reducer's parameter to this GMACs budget per image "
                              "(or several, comma separated) instead of sweeping keep rates: equal cost.")] = None,
    repeats: RepeatsOpt = 5,
    min_seconds: MinSecondsOpt = 2.0,
    warmup: WarmupOpt = 2,
    speed: Annotated[bool, typer.Option(
        "--speed/--no-speed", help="Measure throughput (interleaved with the baseline); --no-speed skips it.")] = True,
    compile_: CompileOpt = False,
    speed_group: SpeedGroupOpt = 4,
    out: OutOpt = Path("results"),
    force: ForceOpt = False,
    max_decoded_mib: Annotated[int, typer.Option(
        "--max-decoded-mib", min=1,
        help="Keep the decoded images in memory up to this size (rows are then written one by one); "
             "larger data is streamed once for all configurations.")] = 2048,
) -> None:
    """Reducers × keep rates (or a GMACs budget): accuracy, GMACs and throughput, one row each.

    Default reducers: tome, evit, imagepiece. Appends to OUT/sweep.csv, one row per configuration plus
    the baseline ('none'); configurations already there are skipped, so an interrupted sweep resumes.
    """
    from ipbench.cli.display import Display, rows_table, wide_console
    from ipbench.runs.context import check_spec
    from ipbench.runs.sweep import SweepRequest, run_sweep

    if match_gmacs is not None and (keep_rates is not None or tome_r is not None):
        raise UserError(f"--match-gmacs and {'--keep-rates' if keep_rates is not None else '--tome-r'} "
                        "exclude each other: a budget sets each reducer's parameter itself")
    req = SweepRequest(
        policies=policies(reducers, "tome,evit,imagepiece"),
        keep_rates=parse_keep_rates(keep_rates) if keep_rates is not None else None,
        knob_values=parse_tome_r(tome_r) if tome_r is not None else None,
        budgets=parse_budgets(match_gmacs) if match_gmacs is not None else None,
        speed=_protocol(run.batch_size, repeats, min_seconds, warmup, compile_, speed_group),
        measure_speed=speed, force=force, max_decoded_mib=max_decoded_mib)
    check_spec(run)
    with Display(None, "sweep") as d:
        report = run_sweep(run, req, out, d)
    caption = list(report.notes)
    if report.accuracy_skipped:
        caption.insert(0, "accuracy skipped: synthetic images have no labels")
    console = wide_console()
    console.print(rows_table(report.rows, f"sweep: {report.model} on {report.data}", "\n".join(caption) or None))
    if report.accuracy_skipped:
        typer.echo("accuracy skipped: synthetic images have no labels (GMACs and throughput only)", err=True)
    if report.skipped_images:
        typer.echo(f"skipped {len(report.skipped_images)} unreadable image(s); first: {report.skipped_images[0]}",
                   err=True)
    done = (f"{report.measured} configuration(s) measured" if report.measured
            else "nothing to measure (use --force to measure again)")
    resumed = f", {report.skipped} already in the CSV" if report.skipped else ""
    console.print(f"{done}{resumed}; rows in {report.csv_path}", soft_wrap=True)
    if not report.accuracy_skipped and len(report.rows) > 1 and main_rank():
        _which_differences_are_real(report.csv_path.parent, {str(r["config_key"]) for r in report.rows})


def _which_differences_are_real(folder: Path, keys: set[str]) -> None:
    """After a sweep: its rows' paired comparisons (as `ipbench compare` shows them), or one line on
    why there are none (rows of an older ipbench have no per-image records)."""
    from ipbench.cli.display import print_comparisons
    from ipbench.plots.compare import compare_folder

    try:
        pairs = compare_folder(folder, "sweep", keys=keys)
    except UserError as exc:
        typer.echo(f"no paired comparison: {exc}", err=True)
        return
    print_comparisons(pairs, f"which differences are real ({len(pairs)} pairs; ipbench compare {folder} for "
                             "their intervals and compare.csv)", compact=True)


@app.command("flops")
@handle_errors
@run_options(exclude=("limit", "amp_dtype", "batch_size", "workers"))
def flops_cmd(
    run: RunSpec,
    reducers: ReducersOpt = None,
    images: Annotated[int, typer.Option(
        "--images", min=1, help="Real images traced by fvcore (evenly spaced over the data); token counts "
                                "are static, so one is enough.")] = 1,
    out: OutOpt = Path("results"),
) -> None:
    """GMACs per image of the baseline and each reducer: fvcore (with the SDPA handle) and analytic.

    The two counts must agree within 1 %. Appends one row per reducer to OUT/flops.csv. GMACs do not
    depend on the weights: --weights random --data synthetic needs no file at all.
    """
    from ipbench.cli.display import Display, rows_table, wide_console
    from ipbench.runs.cost import run_flops

    with Display(None, "flops") as d:
        outcome = run_flops(run, policies(reducers, "none"), images, out, d)
    rows = outcome.rows
    caption = (f"GMACs per image: {rows[0]['flop_counter']} on {rows[0]['num_images']} image(s) of "
               f"{rows[0]['data']}; analytic from the static token plan")
    wide_console().print(rows_table(rows, f"flops: {rows[0]['model']}", caption,
                                    columns=("tokens", "gmacs", "analytic")))
    typer.echo(f"{len(rows)} row(s) appended to {outcome.csv_path}")


@app.command("speed")
@handle_errors
@run_options(exclude=("limit", "workers"))
def speed_cmd(
    run: RunSpec,
    reducers: ReducersOpt = None,
    repeats: RepeatsOpt = 5,
    min_seconds: MinSecondsOpt = 2.0,
    warmup: WarmupOpt = 2,
    compile_: CompileOpt = False,
    compile_mode: CompileModeOpt = "default",
    speed_group: SpeedGroupOpt = 4,
    batch_sizes: Annotated[str | None, typer.Option(
        "--batch-sizes", help="Time at each of these batch sizes, e.g. 1,8,64,256 (every model against the "
                              "baseline at each size; one row per model and size). Default: --batch-size.")] = None,
    timm_csv: Annotated[Path | None, typer.Option(
        "--timm-csv", help="Also write these rows with the columns of timm's benchmark CSVs (model, "
                           "infer_samples_per_sec, infer_step_time, infer_batch_size, ...) to this file.")] = None,
    out: OutOpt = Path("results"),
) -> None:
    """Throughput of the baseline and each reducer, interleaved on one fixed batch of real images.

    img/s median (min–max) over the rounds, and the speed-up as the median of per-round paired
    ratios against the baseline; per-forward latency (median, p90), peak memory of a forward and the
    attention kernel that served it. Appends one row per model and batch size to OUT/speed.csv.
    """
    from ipbench.cli.display import Display, rows_table, wide_console
    from ipbench.cli.options import parse_batch_sizes
    from ipbench.runs.context import check_spec
    from ipbench.runs.cost import run_speed

    sizes = parse_batch_sizes(batch_sizes) if batch_sizes is not None else [run.batch_size]
    if timm_csv is not None and not timm_csv.parent.is_dir():
        raise UserError(f"--timm-csv {timm_csv}: no such folder {timm_csv.parent}")
    check_spec(run)
    protocol = _protocol(sizes[0], repeats, min_seconds, warmup, compile_, speed_group, compile_mode)
    with Display(None, "speed") as d:
        outcome = run_speed(run, policies(reducers, "none"), protocol, out, d, sizes)
    rows = outcome.rows
    shown = ", ".join(map(str, sizes))
    caption = (f"batch {shown}: images from {rows[0]['data']}, {outcome.ctx.dtype}, "
               f"{rows[0]['threads']} thread(s), {repeats} rounds of >= {min_seconds:g} s; latency: one forward "
               "of the batch, median (p90); memory: peak a forward allocates (activations)")
    if rows[0].get("cuda"):
        caption += f"; CUDA {rows[0]['cuda']}, cuDNN {rows[0]['cudnn']}, driver {rows[0]['driver'] or 'unknown'}"
    wide_console().print(rows_table(rows, f"speed: {rows[0]['model']} on {rows[0]['device_name']}", caption,
                                    columns=("batch", "tokens", "analytic", "speed", "latency")))
    for note in outcome.notes:
        typer.echo(f"warning: {note}", err=True)
    typer.echo(f"{len(rows)} row(s) appended to {outcome.csv_path}")
    if timm_csv is not None:
        import pandas as pd

        from ipbench.results import timm_benchmark_rows

        params = sum(p.numel() for p in outcome.ctx.net.parameters())
        table = timm_benchmark_rows(rows, outcome.ctx.source.input_size[-1], params)
        pd.DataFrame(table).to_csv(timm_csv, index=False)
        typer.echo(f"timm benchmark columns: {timm_csv}")


@app.command("sensitivity")
@handle_errors
@run_options()
def sensitivity_cmd(
    run: RunSpec,
    reducers: ReducersOpt = None,
    patch_sizes: Annotated[str, typer.Option(
        "--patch-sizes", help="Patch sizes to rebuild the model with, at its own resolution, comma separated.")]
        = "8,12,16,24,32",
    img_sizes: Annotated[str, typer.Option(
        "--img-sizes", help="Resolutions to run the model at, with its own patch size, comma separated.")]
        = "160,224,288,384",
    keep: Annotated[float, typer.Option(
        "--keep", min=0.0, max=1.0, help="The keep rate every variant is swept at (ToMe's r and other knobs: "
                                          "the value matching EViT's GMACs at it on that variant).")] = 0.7,
    speed: Annotated[bool, typer.Option(
        "--speed/--no-speed", help="Also time each variant against its own baseline (slow on a CPU).")] = False,
    out: OutOpt = Path("results"),
    force: ForceOpt = False,
) -> None:
    """Each reducer as the patch size and the resolution vary, on the SAME weights (embeddings resampled).

    Default reducers: tome, evit, imagepiece. One sweep per variant (OUT/sensitivity/<variant>/, each
    resuming), gathered into OUT/sensitivity.csv: accuracy, tokens, GMACs and the GMACs ratio against
    the variant's own baseline; `ipbench plot OUT` draws it.
    """
    from ipbench.cli.display import Display, sensitivity_table, wide_console
    from ipbench.cli.options import parse_sizes
    from ipbench.measure.throughput import SpeedProtocol
    from ipbench.runs.context import check_spec
    from ipbench.runs.sensitivity import SensitivityRequest, run_sensitivity
    from ipbench.runs.sweep import SweepRequest

    if not 0.0 < keep <= 1.0:
        raise UserError(f"bad --keep {keep:g}: a keep rate must be in (0, 1]")
    if run.img_size is not None or run.patch_size is not None:
        raise UserError("sensitivity sets the patch size and resolution itself: use --patch-sizes and --img-sizes "
                        "instead of --patch-size/--img-size")
    req = SensitivityRequest(
        policies=policies(reducers, "tome,evit,imagepiece"), patch_sizes=parse_sizes(patch_sizes, "--patch-sizes", 2),
        img_sizes=parse_sizes(img_sizes, "--img-sizes", 8), keep=keep,
        sweep=SweepRequest(policies=[], speed=SpeedProtocol(batch_size=run.batch_size), measure_speed=speed,
                           force=force))
    check_spec(run)
    with Display(None, "sensitivity") as d:
        csv_path, rows, notes = run_sensitivity(run, req, out, d)
    console = wide_console()
    console.print(sensitivity_table(rows, f"sensitivity: {run.model}, keep rate {keep:g}", "\n".join(notes) or None))
    console.print(f"{len(rows)} row(s) in {csv_path}", soft_wrap=True)
