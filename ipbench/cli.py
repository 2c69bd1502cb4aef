"""The ipbench command line: one small function per command, wiring only.

torch, timm and pandas are imported inside the commands so that ``ipbench --help`` stays fast.
"""

import functools
import os
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from ipbench.errors import UserError

app = typer.Typer(
    name="ipbench",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(fn: F) -> F:
    """Turn UserError into one stderr line + exit 2, and Ctrl-C into exit 130 (rows are kept)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; rows written so far are kept", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


class DType(str, Enum):
    float32 = "float32"


DEFAULT_WORKERS = min(4, os.cpu_count() or 1)

ModelOpt = Annotated[str, typer.Option(
    "--model", "-m",
    help="Model: an alias (deit_t, deit_s, deit_b; see `ipbench models`) or any timm ViT name.")]
CheckpointOpt = Annotated[str | None, typer.Option(
    "--checkpoint", envvar="IPBENCH_CHECKPOINT", show_envvar=True,
    help="Local weights file (.safetensors or .pth, timm key names), loaded strictly. "
         "Without it, timm's pretrained download (cached by the hub client) is used.")]
DataOpt = Annotated[str, typer.Option(
    "--data", envvar="IPBENCH_DATA", show_envvar=True,
    help="ImageNet-style validation folder (one sub-folder per wnid), a CSV with columns file,label "
         "(paths relative to the CSV), or 'synthetic' (random images: speed only, no accuracy).")]
LimitOpt = Annotated[int | None, typer.Option(
    "--limit", min=1,
    help="Use N images evenly spaced over the sorted list (deterministic, all classes represented); "
         "for synthetic data, the number of images (default 256).")]
SkipBadOpt = Annotated[bool, typer.Option(
    "--skip-bad", help="Skip unreadable images and report how many, instead of stopping with an error.")]
ReducerOpt = Annotated[str, typer.Option(
    "--reducer", help="Token reducer spec, e.g. 'evit:keep=0.7' or 'tome:r=13'; 'none' is plain timm.")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="Where the model runs.")]
DTypeOpt = Annotated[DType, typer.Option("--dtype", help="Model and input precision.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per batch.")]
WorkersOpt = Annotated[int, typer.Option(
    "--workers", min=0, help="Image-decoding worker processes (0 decodes in the main process).")]
ThreadsOpt = Annotated[int | None, typer.Option(
    "--threads", min=1, help="torch CPU threads (torch.set_num_threads); default: torch's own choice.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (synthetic images, anything random).")]
OutOpt = Annotated[Path, typer.Option(
    "--out", "-o", help="Folder for the result CSVs (eval appends to eval.csv).")]


@app.callback()
def _root() -> None:
    """Measure what token reduction does to timm Vision Transformers: accuracy, GMACs, throughput.

    Weights: --checkpoint FILE or IPBENCH_CHECKPOINT (else timm's hub download).
    Data: --data PATH or IPBENCH_DATA. Results are appended to CSVs under --out (default results/).
    """


@app.command("models")
@handle_errors
def models_cmd(
    timm_pattern: Annotated[str | None, typer.Option(
        "--timm", help="Also list timm model names matching this pattern, e.g. '*vit*' or 'deit*'.")] = None,
) -> None:
    """List the model aliases; any timm ViT name is accepted as well."""
    from rich.console import Console
    from rich.table import Table

    from ipbench.models import ALIASES

    table = Table(title="model aliases")
    table.add_column("alias")
    table.add_column("timm name")
    for alias, name in ALIASES.items():
        table.add_row(alias, name)
    console = Console()
    console.print(table)
    console.print("Any timm ViT name works as well: ipbench models --timm '*vit*'")
    if timm_pattern:
        import timm

        names = timm.list_models(timm_pattern)
        if not names:
            raise UserError(f"no timm model matches {timm_pattern!r}")
        console.print("\n".join(names), soft_wrap=True)


def _check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available on this machine "
                        f"(torch {torch.__version__}); use --device cpu")


@app.command("eval")
@handle_errors
def eval_cmd(
    model: ModelOpt = "deit_t",
    checkpoint: CheckpointOpt = None,
    data: DataOpt = "synthetic",
    limit: LimitOpt = None,
    skip_bad: SkipBadOpt = False,
    reducer: ReducerOpt = "none",
    device: DeviceOpt = Device.cpu,
    dtype: DTypeOpt = DType.float32,
    batch_size: BatchOpt = 32,
    workers: WorkersOpt = DEFAULT_WORKERS,
    threads: ThreadsOpt = None,
    seed: SeedOpt = 0,
    out: OutOpt = Path("results"),
) -> None:
    """Top-1/top-5 of one model (optionally with a token reducer) on a data source.

    Prints a table and appends one row to OUT/eval.csv (columns: see the README).
    """
    import torch
    from rich.console import Console
    from rich.table import Table

    from ipbench import data as datamod
    from ipbench import models, results
    from ipbench.measure.accuracy import evaluate

    _check_device(device.value)
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    net = models.create_model(model, checkpoint, device=device.value)
    net = net.to(getattr(torch, dtype.value))
    info = models.prepare_reducer(net, reducer)
    source = datamod.open_source(data, net, limit=limit, skip_bad=skip_bad, seed=seed)

    start = time.perf_counter()
    res = evaluate({model: net}, source.batches(batch_size, workers), source.mean, source.std,
                   device=device.value, total=source.num_images, dtype=getattr(torch, dtype.value))[model]
    seconds = time.perf_counter() - start

    sha = models.checkpoint_sha256(checkpoint) if checkpoint else ""
    hub_id = net.pretrained_cfg.get("hf_hub_id") or model
    ckpt = str(Path(checkpoint).resolve()) if checkpoint else f"hub:{hub_id}"
    timm_name = models.resolve_name(model)
    key = results.config_key({
        "command": "eval", "model": timm_name, "checkpoint": sha or ckpt, "data": source.path,
        "num_images": source.num_images, "reducer": info.spec, "dtype": dtype.value, "device": device.value,
    })
    row = {
        **results.common_fields(device.value, dtype.value, batch_size, threads, seed),
        "config_key": key,
        "model": timm_name,
        "checkpoint": ckpt,
        "checkpoint_sha256": sha[:16],
        "data": source.path,
        "num_images": res.images,
        "skipped_images": len(source.skipped),
        "reducer": info.spec,
        "reducer_params": info.params_json,
        "training_free": info.training_free,
        "tokens_per_layer": " ".join(map(str, info.tokens_per_layer)),
        "final_tokens": info.final_tokens,
        "top1": "" if res.top1 is None else round(res.top1, 3),
        "top5": "" if res.top5 is None else round(res.top5, 3),
        "correct1": res.correct1,
        "correct5": res.correct5,
    }
    csv_path = out / "eval.csv"
    results.append_row(csv_path, row, results.EVAL_COLUMNS)

    def pct(value: float | None, correct: int) -> str:
        return "n/a" if value is None else f"{value:.1f} ({correct}/{res.total})"

    table = Table(title=f"eval: {timm_name} on {source.path}",
                  caption=None if source.has_labels else "accuracy n/a: synthetic images have no labels")
    table.add_column("reducer", overflow="fold")
    for col in ("images", "final tokens", "top-1 %", "top-5 %", "img/s"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_row(info.spec, str(res.images), str(info.final_tokens), pct(res.top1, res.correct1),
                  pct(res.top5, res.correct5), f"{res.images / seconds:.1f}" if seconds > 0 else "-")
    console = Console()
    console.print(table)
    if source.skipped:
        typer.echo(f"skipped {len(source.skipped)} unreadable image(s); first: {source.skipped[0]}", err=True)
    console.print(f"row appended to {csv_path}", soft_wrap=True)


ResultsArg = Annotated[Path, typer.Argument(
    help="Folder holding the result CSVs (sweep.csv, eval.csv, robustness.csv, ...).")]


def _results_folder(folder: Path) -> Path:
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder (give the folder the result CSVs were written to)")
    return folder


@app.command("plot")
@handle_errors
def plot_cmd(
    folder: ResultsArg = Path("results"),
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Folder for the figures (default: FOLDER/plots).")] = None,
) -> None:
    """Figures (PNG + SVG) and FOLDER/REPORT.md from every ipbench CSV in a folder.

    A missing or empty CSV, or a column a figure needs, skips that figure with a note.
    """
    from ipbench.plots import plot_folder
    from ipbench.report import write_report

    done = plot_folder(_results_folder(folder), out)
    for name, pngs in done.figures.items():
        for png in pngs:
            typer.echo(f"{name}: {png}")
    for note in done.notes:
        typer.echo(f"note: {note}")
    if not done.tables:
        typer.echo(f"no ipbench result CSV with rows in {folder}")
    typer.echo(f"report: {write_report(folder, done, command='plot')}")


@app.command("report")
@handle_errors
def report_cmd(folder: ResultsArg = Path("results")) -> None:
    """Write FOLDER/REPORT.md (settings, tables, existing figures) without redrawing the figures."""
    from ipbench.report import write_report

    typer.echo(f"report: {write_report(_results_folder(folder))}")


@app.command("visualize")
@handle_errors
def visualize_cmd(
    image: Annotated[Path, typer.Option(
        "--image", "-i", help="The image file (any format PIL reads); it gets the model's eval crop.")],
    reducer: Annotated[str, typer.Option(
        "--reducer", help="Token reducer spec whose token groups are drawn, e.g. 'imagepiece' or 'tome:r=13'.")],
    layer: Annotated[str | None, typer.Option(
        "--layer", help="Block(s) after which the groups are drawn, 0-indexed: 11, -1, 2,5,8,11 or 'all' "
                        "(default: the last block).")] = None,
    model: ModelOpt = "deit_t",
    checkpoint: CheckpointOpt = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="PNG file to write (default: results/tokens_<image name>.png).")] = None,
) -> None:
    """Draw the token groups of a reducer over an image (each merged token one colour, discarded patches grey).

    Traces one forward pass: after the chosen block, every token's source patches.
    """
    from ipbench.visualize import visualize

    typer.echo(f"figure: {visualize(image, reducer, layer, model, checkpoint, out)}")


@app.command("reproduce")
@handle_errors
def reproduce_cmd(
    recipe: Annotated[Path, typer.Argument(help="Recipe file: one paper table or figure, e.g. recipes/table4.toml.")],
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Model for every step (default: the recipe's, usually the paper's).")] = None,
    checkpoint: CheckpointOpt = None,
    data: Annotated[str | None, typer.Option(
        "--data", envvar="IPBENCH_DATA", show_envvar=True,
        help="Data for every step: an ImageNet-style folder, a file,label CSV, or 'synthetic'.")] = None,
    limit: LimitOpt = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Folder for the CSVs, figures and comparison (default: results/<recipe name>).")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="KEY=VALUE: one more option for every step that has it, e.g. --set repeats=1 "
                      "--set min_seconds=0.2 (repeatable).")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the commands the recipe would run, and run nothing.")] = False,
    compare_only: Annotated[bool, typer.Option(
        "--compare-only", help="Run nothing: compare the CSVs already in --out with the paper.")] = False,
    plot: Annotated[bool, typer.Option(
        "--plot/--no-plot", help="Also write the figures and REPORT.md of the output folder.")] = True,
) -> None:
    """Run a recipe (the commands of one paper table) and print the paper's numbers beside ours.

    The commands run in this process, in order; a failing step stops the recipe. The comparison
    is also written to OUT/<recipe name>.md.
    """
    import shlex

    from rich.console import Console

    from ipbench import recipes as rc

    spec = rc.load_recipe(recipe)
    extra: dict[str, str] = {}
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set repeats=1")
        extra[key.strip()] = value.strip()
    folder = out or Path("results") / recipe.stem
    overrides = {"model": model, "checkpoint": checkpoint, "data": data, "limit": limit, "out": str(folder)}
    argvs = rc.build_argv(spec, overrides, extra)
    console = Console()
    console = console if console.is_terminal else Console(width=200)  # logs get whole table rows
    console.print(f"[bold]{spec.title}[/]" + (f"\n{spec.paper}" if spec.paper else ""), soft_wrap=True)
    if dry_run or compare_only:
        for argv in argvs:
            console.print(f"ipbench {shlex.join(argv)}", soft_wrap=True, highlight=False)
        if dry_run:
            return
    else:
        for i, argv in enumerate(argvs, 1):
            console.print(f"[bold][{i}/{len(argvs)}][/] ipbench {shlex.join(argv)}", soft_wrap=True, highlight=False)
            rc.run_step(argv)
    run_model = model or spec.defaults.get("model") or "deit_t"
    comps = [rc.compare(spec, c, folder, run_model) for c in spec.compares]
    for comp in comps:
        rc.print_comparison(comp, console.print)
    folder.mkdir(parents=True, exist_ok=True)
    md = folder / f"{recipe.stem}.md"
    md.write_text(rc.comparison_markdown(spec, comps, argvs), encoding="utf-8")
    console.print(f"comparison: {md}", soft_wrap=True)
    if plot:
        from ipbench.plots import plot_folder
        from ipbench.report import write_report

        console.print(f"report: {write_report(folder, plot_folder(folder), command='plot')}", soft_wrap=True)


class Precision(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


ReducersOpt = Annotated[list[str] | None, typer.Option(
    "--reducers", "-r",
    help="Reducer specs separated by commas (or the option repeated): 'tome,evit', "
         "'evit:keep=0.7,fuse=false,imagepiece:r=k/2'. A piece with '=' continues the spec before it. "
         "The baseline 'none' is always included. Default: sweep tome,evit,imagepiece; flops/speed none only.")]
SpeedPrecisionOpt = Annotated[Precision, typer.Option(
    "--dtype", help="Timing precision: float32, or autocast to bfloat16 (CPU/CUDA) or float16 (CUDA); "
                    "weights stay float32.")]
RepeatsOpt = Annotated[int, typer.Option(
    "--repeats", min=1, help="Timed rounds; each round times every model once, interleaved.")]
MinSecondsOpt = Annotated[float, typer.Option(
    "--min-seconds", min=0.0, help="Each timing repeats the forward pass for at least this long.")]
WarmupOpt = Annotated[int, typer.Option("--warmup", min=1, help="Untimed forward passes per model first.")]
CompileOpt = Annotated[bool, typer.Option(
    "--compile", help="torch.compile every model before timing (the warm-up compiles).")]
SpeedGroupOpt = Annotated[int, typer.Option(
    "--speed-group", min=0,
    help="Reducers timed per interleaved group with the baseline (each group its own rounds); small "
         "groups pair every reducer with a baseline timing close in time. 0 = all in one group.")]


def _speed_settings(batch_size: int, repeats: int, min_seconds: float, warmup: int, device: Device,
                    dtype: Precision, threads: int | None, compile_: bool, group: int) -> Any:
    from ipbench.sweep import SpeedSettings

    _check_device(device.value)
    return SpeedSettings(batch_size=batch_size, repeats=repeats, min_seconds=min_seconds, warmup=warmup,
                         device=device.value, dtype=dtype.value, threads=threads, compile=compile_, group=group)


@app.command("sweep")
@handle_errors
def sweep_cmd(
    model: ModelOpt = "deit_t",
    checkpoint: CheckpointOpt = None,
    data: DataOpt = "synthetic",
    limit: LimitOpt = None,
    skip_bad: SkipBadOpt = False,
    reducers: ReducersOpt = None,
    keep_rates: Annotated[str | None, typer.Option(
        "--keep-rates", help="Keep rates ρ in (0, 1], comma separated (default 0.9,0.8,0.7,0.6,0.5). "
                             "evit/topk/imagepiece/mstm get keep=ρ; ToMe the r closest to EViT's GMACs at ρ.")] = None,
    tome_r: Annotated[str | None, typer.Option(
        "--tome-r", help="Run ToMe at these r values (e.g. 8,13,16) instead of mapping each keep rate to r.")] = None,
    match_gmacs: Annotated[str | None, typer.Option(
        "--match-gmacs", help="Calibrate every reducer's parameter to this GMACs budget per image "
                              "(or several, comma separated) instead of sweeping keep rates: equal cost.")] = None,
    batch_size: BatchOpt = 32,
    repeats: RepeatsOpt = 5,
    min_seconds: MinSecondsOpt = 2.0,
    warmup: WarmupOpt = 2,
    speed: Annotated[bool, typer.Option(
        "--speed/--no-speed", help="Measure throughput (interleaved with the baseline); --no-speed skips it.")] = True,
    device: DeviceOpt = Device.cpu,
    dtype: SpeedPrecisionOpt = Precision.float32,
    threads: ThreadsOpt = None,
    compile_: CompileOpt = False,
    speed_group: SpeedGroupOpt = 4,
    workers: WorkersOpt = DEFAULT_WORKERS,
    seed: SeedOpt = 0,
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Folder for the result CSVs (the sweep appends to sweep.csv).")] = Path("results"),
    force: Annotated[bool, typer.Option(
        "--force", help="Measure configurations already in sweep.csv again (appends new rows).")] = False,
    max_decoded_mib: Annotated[int, typer.Option(
        "--max-decoded-mib", min=1,
        help="Keep the decoded images in memory up to this size (rows are then written one by one); "
             "larger data is streamed once for all configurations.")] = 2048,
) -> None:
    """Reducers × keep rates (or a GMACs budget): accuracy, GMACs and throughput, one row each.

    Appends to OUT/sweep.csv, one row per configuration plus the baseline ('none'); configurations
    already there are skipped, so an interrupted sweep resumes where it stopped.
    """
    from ipbench import sweep as sw

    if match_gmacs is not None and (keep_rates is not None or tome_r is not None):
        raise UserError(f"--match-gmacs and {'--keep-rates' if keep_rates is not None else '--tome-r'} "
                        "exclude each other: a budget sets each reducer's parameter itself")
    settings = sw.SweepSettings(
        model=model, checkpoint=checkpoint, data=data, limit=limit, skip_bad=skip_bad,
        reducers=reducers or ["tome,evit,imagepiece"],
        keep_rates=sw.parse_keep_rates(keep_rates) if keep_rates is not None else None,
        tome_r=sw.parse_tome_r(tome_r) if tome_r is not None else None,
        budgets=sw.parse_budgets(match_gmacs) if match_gmacs is not None else None,
        speed=_speed_settings(batch_size, repeats, min_seconds, warmup, device, dtype, threads, compile_,
                              speed_group),
        measure_speed=speed, workers=workers, seed=seed, out=out, force=force, max_decoded_mib=max_decoded_mib,
    )
    report = sw.run_sweep(settings)
    caption = list(report.notes)
    if report.accuracy_skipped:
        caption.insert(0, "accuracy skipped: synthetic images have no labels")
    console = sw.wide_console()
    console.print(sw.rows_table(report.rows, f"sweep: {report.model} on {report.data}",
                                "\n".join(caption) or None))
    if report.accuracy_skipped:
        typer.echo("accuracy skipped: synthetic images have no labels (GMACs and throughput only)", err=True)
    if report.skipped_images:
        typer.echo(f"skipped {len(report.skipped_images)} unreadable image(s); first: {report.skipped_images[0]}",
                   err=True)
    done = (f"{report.measured} configuration(s) measured" if report.measured
            else "nothing to measure (use --force to measure again)")
    resumed = f", {report.skipped} already in the CSV" if report.skipped else ""
    console.print(f"{done}{resumed}; rows in {report.csv_path}", soft_wrap=True)


@app.command("flops")
@handle_errors
def flops_cmd(
    model: ModelOpt = "deit_t",
    checkpoint: CheckpointOpt = None,
    data: DataOpt = "synthetic",
    reducers: ReducersOpt = None,
    images: Annotated[int, typer.Option(
        "--images", min=1, help="Real images traced by fvcore (evenly spaced over the data); token counts "
                                "are static, so one is enough.")] = 1,
    device: DeviceOpt = Device.cpu,
    threads: ThreadsOpt = None,
    seed: SeedOpt = 0,
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Folder for the result CSVs (appends to flops.csv).")] = Path("results"),
) -> None:
    """GMACs per image of the baseline and each reducer: fvcore (with the SDPA handle) and analytic.

    The two counts must agree within 1 %. Appends one row per reducer to OUT/flops.csv.
    """
    from ipbench import sweep as sw

    _check_device(device.value)
    csv_path, rows = sw.run_flops(model, checkpoint, data, reducers or [], images, device.value, threads, seed, out)
    bad = [r for r in rows if sw.flops_disagree(r)]
    console = sw.wide_console()
    caption = f"GMACs per image: {rows[0]['flop_counter']} on {rows[0]['num_images']} real image(s) of " \
              f"{rows[0]['data']}; analytic from the static token plan"
    console.print(sw.rows_table(rows, f"flops: {rows[0]['model']}", caption, columns=("tokens", "gmacs", "analytic")))
    for r in bad:
        typer.echo(f"warning: {r['reducer_spec']}: fvcore {r['gmacs']} and analytic {r['gmacs_analytic']} "
                   "GMACs differ by more than 1 %", err=True)
    console.print(f"{len(rows)} row(s) appended to {csv_path}", soft_wrap=True)


@app.command("speed")
@handle_errors
def speed_cmd(
    model: ModelOpt = "deit_t",
    checkpoint: CheckpointOpt = None,
    data: DataOpt = "synthetic",
    reducers: ReducersOpt = None,
    batch_size: BatchOpt = 32,
    repeats: RepeatsOpt = 5,
    min_seconds: MinSecondsOpt = 2.0,
    warmup: WarmupOpt = 2,
    device: DeviceOpt = Device.cpu,
    dtype: SpeedPrecisionOpt = Precision.float32,
    threads: ThreadsOpt = None,
    compile_: CompileOpt = False,
    speed_group: SpeedGroupOpt = 4,
    seed: SeedOpt = 0,
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Folder for the result CSVs (appends to speed.csv).")] = Path("results"),
) -> None:
    """Throughput of the baseline and each reducer, interleaved on one fixed batch of real images.

    img/s median [min–max] over the rounds, and the speed-up as the median of per-round paired
    ratios against the baseline. Appends one row per model to OUT/speed.csv.
    """
    from ipbench import sweep as sw

    settings = _speed_settings(batch_size, repeats, min_seconds, warmup, device, dtype, threads, compile_,
                               speed_group)
    csv_path, rows = sw.run_speed(model, checkpoint, data, reducers or [], settings, seed, out)
    caption = (f"{settings.batch_size} images per batch from {rows[0]['data']}, {settings.dtype}, "
               f"{rows[0]['threads']} thread(s), {settings.repeats} rounds of >= {settings.min_seconds:g} s")
    console = sw.wide_console()
    console.print(sw.rows_table(rows, f"speed: {rows[0]['model']} on {rows[0]['device_name']}", caption,
                                columns=("tokens", "analytic", "speed")))
    console.print(f"{len(rows)} row(s) appended to {csv_path}", soft_wrap=True)


@app.command("reducers")
@handle_errors
def reducers_cmd(
    name: Annotated[str | None, typer.Option(
        "--name", help="Show only this reducer (e.g. imagepiece).")] = None,
    plain: Annotated[bool, typer.Option(
        "--plain", help="Tidy text (one 'reducer param=default: help' line each) instead of a table.")] = False,
) -> None:
    """The registered token reducers: parameters, defaults and what each one does.

    A spec names a reducer and sets parameters: 'evit:keep=0.7,fuse=false', 'tome:r=13',
    combinations 'imagepiece+tome'.
    """
    from rich.console import Console
    from rich.table import Table

    from ipbench.reducers import list_reducers
    from ipbench.reducers.policy import format_value

    classes = list_reducers()
    if name is not None:
        classes = [c for c in classes if c.name == name.strip().lower()]
        if not classes:
            raise UserError(f"unknown reducer {name!r}; valid: {', '.join(sorted(c.name for c in list_reducers()))}")
    if plain:
        for cls in classes:
            typer.echo(f"{cls.name}: {cls.description}")
            for p in cls.PARAMS:
                typer.echo(f"  {p.describe()}")
        return
    table = Table(title="token reducers (spec: name:param=value,...; combine with +)", show_lines=True)
    table.add_column("reducer", no_wrap=True)
    table.add_column("parameter", no_wrap=True)
    table.add_column("default", overflow="fold")
    table.add_column("what it does", overflow="fold")
    for cls in classes:
        table.add_row(f"[bold]{cls.name}[/]", "", "", cls.description)
        for p in cls.PARAMS:
            choices = f" ({'|'.join(p.choices)})" if p.choices else ""
            table.add_row("", p.name, format_value(p.default), p.help + choices)
    Console().print(table)


# -- the paper's analyses (ipbench.analyses) ------------------------------------------------------

AnalysisReducersOpt = Annotated[list[str] | None, typer.Option(
    "--reducers", "-r",
    help="Reducer specs separated by commas (or the option repeated), e.g. 'tome:r=13,evit,imagepiece'; "
         "a piece with '=' continues the spec before it. Default: see the command's help.")]
AnalysisDataOpt = Annotated[str, typer.Option(
    "--data", envvar="IPBENCH_DATA", show_envvar=True,
    help="ImageNet-style validation folder, a CSV with columns file,label, or 'synthetic' "
         "(no labels: no accuracy). All images are decoded once and kept in memory.")]
AnalysisOutOpt = Annotated[Path, typer.Option(
    "--out", "-o", help="Folder for the result CSVs (each analysis appends to its own <command>.csv).")]
ForceOpt = Annotated[bool, typer.Option(
    "--force", help="Measure rows already in the CSV again (appends newer rows) instead of resuming.")]
AnalysisBatchOpt = Annotated[int, typer.Option(
    "--batch-size", "-b", min=1, help="Images per forward pass (traces of a batch are held in memory).")]


def _analysis_settings(model: str, checkpoint: str | None, data: str, limit: int | None,
                       reducers: list[str] | None, batch_size: int, device: Device, threads: int | None,
                       workers: int, seed: int, out: Path, force: bool) -> Any:
    from ipbench.analyses.common import Settings

    return Settings(model=model, checkpoint=checkpoint, data=data, limit=limit, reducers=list(reducers or []),
                    batch_size=batch_size, device=device.value, threads=threads, workers=workers, seed=seed,
                    out=out, force=force)


def _analysis_done(outcome: Any, print_table: Callable[[Any], None]) -> None:
    """The paper-shaped table, the notes, and what was measured or resumed."""
    if outcome.rows:
        print_table(outcome)
    for note in outcome.notes:
        typer.echo(f"note: {note}")
    what = (f"{outcome.measured} row(s) measured" if outcome.measured
            else "nothing new measured (use --force to measure again)")
    resumed = f", {outcome.resumed} already in the CSV" if outcome.resumed else ""
    typer.echo(f"{what}{resumed}; rows in {outcome.csv_path}")


@app.command("robustness")
@handle_errors
def robustness_cmd(
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
    model: ModelOpt = "deit_t",
    checkpoint: CheckpointOpt = None,
    data: AnalysisDataOpt = "synthetic",
    limit: LimitOpt = None,
    reducers: AnalysisReducersOpt = None,
    batch_size: AnalysisBatchOpt = 32,
    device: DeviceOpt = Device.cpu,
    threads: ThreadsOpt = None,
    workers: WorkersOpt = DEFAULT_WORKERS,
    seed: Annotated[int, typer.Option(
        "--seed", help="Mask seed: image i gets its own generator from (seed, i), so every reducer sees the "
                       "same masked images.")] = 0,
    out: AnalysisOutOpt = Path("results"),
    force: ForceOpt = False,
) -> None:
    """Top-1 under random 16x16 masks (paper Table 4), baseline and each reducer.

    Default reducers: tome:r=13, evit, imagepiece (the baseline is always measured). Appends one row per
    reducer and mask count to OUT/robustness.csv; rows already there are skipped.
    """
    from ipbench.analyses import robustness

    counts = robustness.check_options(masks, mask, placement, fill)
    s = _analysis_settings(model, checkpoint, data, limit, reducers, batch_size, device, threads, workers, seed,
                           out, force)
    _analysis_done(robustness.run(s, counts, mask, placement, fill), robustness.print_table)


@app.command("similarity")
@handle_errors
def similarity_cmd(
    model: ModelOpt = "deit_t",
    checkpoint: CheckpointOpt = None,
    data: AnalysisDataOpt = "synthetic",
    limit: LimitOpt = None,
    reducers: AnalysisReducersOpt = None,
    batch_size: AnalysisBatchOpt = 32,
    device: DeviceOpt = Device.cpu,
    threads: ThreadsOpt = None,
    workers: WorkersOpt = DEFAULT_WORKERS,
    seed: SeedOpt = 0,
    out: AnalysisOutOpt = Path("results"),
    force: ForceOpt = False,
) -> None:
    """Cosine similarity of the merged token pairs per block (paper Tables 6 and 8).

    On the reducer's matching metric and on the hidden states. Default reducers: tome:r=13, imagepiece,
    mstm; a reducer that only prunes is skipped with a note. Appends to OUT/similarity.csv.
    """
    from ipbench.analyses import similarity

    s = _analysis_settings(model, checkpoint, data, limit, reducers, batch_size, device, threads, workers, seed,
                           out, force)
    _analysis_done(similarity.run(s), similarity.print_table)


@app.command("importance")
@handle_errors
def importance_cmd(
    top: Annotated[str, typer.Option(
        "--top", help="Top-p sets by CLS attention, in percent, comma separated (the paper's 30,20,15,70).")]
    = "30,20,15,70",
    tokens: Annotated[str, typer.Option(
        "--tokens", help="Which merged tokens count: src (the tokens merged away, ToMe's set A) or both "
                         "(and their destinations).")] = "src",
    model: ModelOpt = "deit_t",
    checkpoint: CheckpointOpt = None,
    data: AnalysisDataOpt = "synthetic",
    limit: LimitOpt = None,
    reducers: AnalysisReducersOpt = None,
    batch_size: AnalysisBatchOpt = 32,
    device: DeviceOpt = Device.cpu,
    threads: ThreadsOpt = None,
    workers: WorkersOpt = DEFAULT_WORKERS,
    seed: SeedOpt = 0,
    out: AnalysisOutOpt = Path("results"),
    force: ForceOpt = False,
) -> None:
    """Share of merged tokens in the top-p % by CLS attention, beside random choice (paper Table 7).

    Per block (the paper shows the first). Default reducers: tome:r=13, imagepiece, mstm; a reducer that
    only prunes is skipped with a note. Appends to OUT/importance.csv.
    """
    from ipbench.analyses import importance

    tops = importance.parse_top(top)
    s = _analysis_settings(model, checkpoint, data, limit, reducers, batch_size, device, threads, workers, seed,
                           out, force)
    _analysis_done(importance.run(s, tops, tokens), importance.print_table)


@app.command("attentiveness")
@handle_errors
def attentiveness_cmd(
    attentive: Annotated[float | None, typer.Option(
        "--attentive", help="ρ: a token is attentive when inside the top ρ fraction by CLS attention of its "
                            "block (default: the reducer's keep rate; 0.7 for reducers without one).")] = None,
    population: Annotated[str, typer.Option(
        "--population", help="merged: the inattentive tokens that took part in a merge (re-tokenized); "
                             "inattentive: all inattentive tokens.")] = "merged",
    model: ModelOpt = "deit_t",
    checkpoint: CheckpointOpt = None,
    data: AnalysisDataOpt = "synthetic",
    limit: LimitOpt = None,
    reducers: AnalysisReducersOpt = None,
    batch_size: AnalysisBatchOpt = 32,
    device: DeviceOpt = Device.cpu,
    threads: ThreadsOpt = None,
    workers: WorkersOpt = DEFAULT_WORKERS,
    seed: SeedOpt = 0,
    out: AnalysisOutOpt = Path("results"),
    force: ForceOpt = False,
) -> None:
    """Share of inattentive tokens that are attentive in the next block after merging (paper Table 5).

    Per merging block. Default reducers: imagepiece, tome:r=13, mstm. Appends to OUT/attentiveness.csv.
    """
    from ipbench.analyses import attentiveness

    s = _analysis_settings(model, checkpoint, data, limit, reducers, batch_size, device, threads, workers, seed,
                           out, force)
    _analysis_done(attentiveness.run(s, attentive, population), attentiveness.print_table)


@app.command("coherence")
@handle_errors
def coherence_cmd(
    localities: Annotated[str, typer.Option(
        "--localities", help="λ values of ImagePiece's training-free locality penalty, comma separated "
                             "(0 = off).")] = "0,0.5,1,2",
    prune: Annotated[bool, typer.Option(
        "--prune/--no-prune", help="Also run the retok=prune control (same schedule, pairs dropped).")] = True,
    stem_checkpoint: Annotated[str | None, typer.Option(
        "--stem-checkpoint", help="Weights trained with ImagePiece's conv stem (patch_embed.proj.body.*): adds "
                                  "a stem=conv row on them.")] = None,
    model: ModelOpt = "deit_t",
    checkpoint: CheckpointOpt = None,
    data: AnalysisDataOpt = "synthetic",
    limit: LimitOpt = None,
    reducers: Annotated[list[str] | None, typer.Option(
        "--reducers", "-r", help="ImagePiece specs to vary (each needs an imagepiece part), comma separated; "
                                 "default 'imagepiece'.")] = None,
    batch_size: AnalysisBatchOpt = 32,
    device: DeviceOpt = Device.cpu,
    threads: ThreadsOpt = None,
    workers: WorkersOpt = DEFAULT_WORKERS,
    seed: SeedOpt = 0,
    out: AnalysisOutOpt = Path("results"),
    force: ForceOpt = False,
) -> None:
    """ImagePiece's local-coherence ablation (paper Table 8): locality off vs on, prune control, conv stem.

    Per variant: top-1, GMACs and the mean cosine of the merged pairs. Appends to OUT/coherence.csv.
    """
    from ipbench.analyses import coherence

    lams = coherence.parse_localities(localities)
    s = _analysis_settings(model, checkpoint, data, limit, reducers, batch_size, device, threads, workers, seed,
                           out, force)
    _analysis_done(coherence.run(s, lams, prune, stem_checkpoint), coherence.print_table)


def main() -> None:
    """Console-script entry point (`ipbench`, `python -m ipbench`)."""
    app(prog_name="ipbench")
