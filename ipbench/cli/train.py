"""`ipbench finetune`: fine-tune with a token reducer in place (one process or torchrun)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ipbench.cli.app import app, handle_errors
from ipbench.cli.options import ForceOpt, run_options
from ipbench.errors import UserError

if TYPE_CHECKING:
    from ipbench.runs.context import RunSpec

# the options a [finetune] table of a --config file may set (besides the shared run options)
RECIPE_HELP = "Recipe setting (default: the token-reduction fine-tune recipe; README 'Fine-tuning')."


def _read_config(path: Path) -> dict[str, Any]:
    """The [finetune] table of a TOML recipe file, keys with '_' (a one-line error for a bad file)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    if not path.is_file():
        raise UserError(f"--config {path}: no such file (fine-tune recipes are recipes/finetune_*.toml)")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--config {path}: not valid TOML ({' '.join(str(exc).split())})") from None
    table = doc.get("finetune")
    if not isinstance(table, dict):
        raise UserError(f"--config {path}: no [finetune] table (fine-tune recipes are recipes/finetune_*.toml)")
    return {k.replace("-", "_"): v for k, v in table.items()}


@app.command("finetune")
@handle_errors
@run_options()
def finetune_cmd(
    ctx: typer.Context,
    run: RunSpec,
    reducer: Annotated[str, typer.Option(
        "--reducer", help="Token reducer spec to train with, e.g. 'tome:r=8', 'imagepiece:keep=0.7', "
                          "'imagepiece:keep=0.7,stem=conv'; 'none' fine-tunes the plain model.")] = "none",
    val: Annotated[str | None, typer.Option(
        "--val", help="Validation data (any --data source): top-1/top-5 of the weights and their EMA after "
                      "every epoch.")] = None,
    holdout: Annotated[int | None, typer.Option(
        "--holdout", min=1, help="Validate on N images of --data held out of training (evenly spaced over "
                                 "the sorted list, every class represented) instead of --val.")] = None,
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Folder for finetune.csv and checkpoint/ (model.safetensors, model_ema.safetensors, "
                            "train_state.pt); a rerun resumes from its checkpoint.")] = Path("results/finetune"),
    force: ForceOpt = False,
    config: Annotated[Path | None, typer.Option(
        "--config", help="A TOML recipe (recipes/finetune_*.toml) whose [finetune] table sets any option of "
                         "this command; options given on the command line win.")] = None,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", "-b", min=1,
        help="GLOBAL batch: images per optimizer step over every process and accumulation step (the same run "
             "on 1 or 8 processes).")] = 64,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Epochs (the schedule's length).")] = 30,
    lr: Annotated[float, typer.Option(
        "--lr", help="Learning rate per --lr-base-size images of global batch (scaled linearly, as are "
                     "--min-lr and --warmup-lr).")] = 2e-5,
    lr_base_size: Annotated[int, typer.Option("--lr-base-size", min=1, help="The batch --lr is given for.")] = 512,
    min_lr: Annotated[float, typer.Option("--min-lr", help="Floor of the cosine schedule.")] = 2e-6,
    warmup_epochs: Annotated[int, typer.Option("--warmup-epochs", min=0, help="Linear warm-up epochs.")] = 0,
    warmup_lr: Annotated[float, typer.Option("--warmup-lr", help="Learning rate the warm-up starts at.")] = 1e-6,
    sched: Annotated[str, typer.Option("--sched", help="timm scheduler (cosine, step, ...).")] = "cosine",
    opt: Annotated[str, typer.Option("--opt", help="timm optimizer (adamw, sgd, lamb, ...).")] = "adamw",
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="Weight decay (not on norms, biases, "
                                                                        "embeddings).")] = 0.05,
    clip_grad: Annotated[float | None, typer.Option("--clip-grad", help="Clip the gradient norm to this.")] = None,
    drop_path: Annotated[float, typer.Option("--drop-path", help="Stochastic depth rate.")] = 0.1,
    smoothing: Annotated[float, typer.Option("--smoothing", help="Label smoothing.")] = 0.1,
    mixup: Annotated[float, typer.Option("--mixup", help="Mixup alpha (0: off).")] = 0.8,
    cutmix: Annotated[float, typer.Option("--cutmix", help="CutMix alpha (0: off).")] = 1.0,
    aa: Annotated[str, typer.Option("--aa", help="timm RandAugment spec, or 'none'.")] = "rand-m9-mstd0.5-inc1",
    reprob: Annotated[float, typer.Option("--reprob", help="Random erasing probability.")] = 0.25,
    ema_decay: Annotated[float, typer.Option("--ema-decay", help="ModelEmaV3 decay, with warm-up (0: no EMA).")
                         ] = 0.9998,
    accum_steps: Annotated[int, typer.Option("--accum-steps", min=1, help="Gradient accumulation steps.")] = 1,
    distill: Annotated[str, typer.Option(
        "--distill", help="none, or kd: distil from the same model without reduction (a frozen teacher).")] = "none",
    distill_alpha: Annotated[float, typer.Option("--distill-alpha", help="Weight of the KD term.")] = 0.5,
    distill_tau: Annotated[float, typer.Option("--distill-tau", help="KD temperature.")] = 1.0,
    stem: Annotated[str, typer.Option(
        "--stem", help="Patch embedding: patch (timm's), conv (ImagePiece's local-coherence stem, fitted to the "
                       "patch projection first), auto (conv where the reducer says stem=conv or the weights have "
                       "it).")] = "auto",
    stem_init_steps: Annotated[int, typer.Option(
        "--stem-init-steps", min=0, help="Steps fitting the conv stem to the patch projection before the "
                                         "fine-tune.")] = 200,
    stem_init_lr: Annotated[float, typer.Option("--stem-init-lr", help="Learning rate of that fit.")] = 1e-3,
    max_steps: Annotated[int | None, typer.Option(
        "--max-steps", min=1, help="Stop after this many optimizer steps (the schedule still spans --epochs); "
                                   "rerun with a larger value to go on.")] = None,
    save_every: Annotated[int, typer.Option(
        "--save-every", min=0, help="Also checkpoint every N steps (0: at each epoch's end only).")] = 0,
    log_every: Annotated[int, typer.Option("--log-every", min=1, help="A train row every N steps.")] = 10,
) -> None:
    """Fine-tune a model with a token reducer in place; validate every epoch; resume from checkpoints.

    Runs in one process or under torchrun (`torchrun --nproc-per-node 8 -m ipbench finetune ...`): the
    global batch is split over the processes, so both take the same steps. Writes OUT/finetune.csv
    (loss, lr, images/s; top-1/top-5 of the weights and their EMA per epoch) and OUT/checkpoint/;
    `ipbench eval --checkpoint OUT/checkpoint/model.safetensors` evaluates the result.
    """
    from ipbench.cli.display import Display, wide_console
    from ipbench.reducers import parse_spec
    from ipbench.runs.context import RunSpec as Spec
    from ipbench.runs.finetune import run_finetune
    from ipbench.runs.training import Recipe, Schedule

    values: dict[str, Any] = dict(ctx.params)  # every option by name (the ones below among them)
    if config is not None:
        table = _read_config(config)
        known = set(ctx.params) - {"config"}
        unknown = sorted(set(table) - known)
        if unknown:
            raise UserError(f"--config {config}: unknown setting(s) {', '.join(unknown)}; valid: the options of "
                            "`ipbench finetune --help`, with '_' for '-'")
        for k, v in table.items():
            source = ctx.get_parameter_source(k)
            if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):  # not given on the command line
                values[k] = v
    spec_fields = {f.name for f in dataclasses.fields(Spec)}
    run = dataclasses.replace(run, **{k: _plain(values[k]) for k in spec_fields if k in values})
    recipe_fields = {f.name for f in dataclasses.fields(Recipe)} - {"auto_augment"}
    aa_value = str(values["aa"])
    recipe = Recipe(**{k: values[k] for k in recipe_fields},
                    auto_augment=None if aa_value.lower() in ("none", "") else aa_value)
    schedule = Schedule(max_steps=values["max_steps"], save_every=values["save_every"], log_every=values["log_every"])
    policy = parse_spec(str(values["reducer"]))
    with Display(what="finetune") as d:
        outcome = run_finetune(run, policy, recipe, Path(values["out"]), values["val"], values["holdout"], schedule,
                               bool(values["force"]), d)
    console = wide_console()
    vals = [r for r in outcome.rows if r["kind"] == "val"]
    trains = [r for r in outcome.rows if r["kind"] == "train"]
    if outcome.resumed_from is not None:
        console.print(f"resumed at step {outcome.resumed_from}")
    if outcome.stem_fit is not None:
        console.print(f"conv stem fitted: relative error {outcome.stem_fit.first:.4f} (first 10 steps) -> "
                      f"{outcome.stem_fit.last:.4f} (last 10)")
    if trains:
        console.print(f"loss {trains[0]['loss']} (step {trains[0]['step']}) -> {trains[-1]['loss']} "
                      f"(step {trains[-1]['step']}), {trains[-1]['images_per_sec']} img/s")
    for r in vals:
        ema = f", EMA {r['top1_ema']} %" if r["top1_ema"] != "" else ""
        when = "before training" if int(r["epoch"]) < 0 else f"epoch {int(r['epoch']) + 1} (step {r['step']})"
        console.print(f"{when}: top-1 {r['top1']} % "
                      f"[{r['top1_low']}, {r['top1_high']}]{ema}, top-5 {r['top5']} %")
    if outcome.steps >= outcome.steps_total and not outcome.rows and outcome.resumed_from is not None:
        console.print(f"nothing to do: the run in {outcome.out} is complete ({outcome.steps} steps)")
    for note in outcome.notes:
        typer.echo(f"note: {note}", err=True)
    console.print(f"{outcome.steps}/{outcome.steps_total} steps; rows in {outcome.csv_path}; weights in "
                  f"{outcome.checkpoint / 'model.safetensors'}", soft_wrap=True)


def _plain(v: Any) -> Any:
    return v.value if hasattr(v, "value") else v
