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


def main() -> None:
    """Console-script entry point (`ipbench`, `python -m ipbench`)."""
    app(prog_name="ipbench")
