"""Options declared once: the run options every command that runs a model shares, and the parsing
of the list options (keep rates, budgets, reducer specs) at the edge.

`run_options` adds the shared options (model, weights, data, device, precision, threads, seed,
batch size, workers) to a command's signature and hands the command one `RunSpec` instead of a
dozen arguments; a command that needs another default or help text for one of them says so.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from ipbench.errors import UserError


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


class Precision(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Weights(str, Enum):
    pretrained = "pretrained"
    random = "random"


DEFAULT_WORKERS = min(4, os.cpu_count() or 1)

ModelOpt = Annotated[str, typer.Option(
    "--model", "-m",
    help="Model: an alias (deit_t, deit_s, deit_b; see `ipbench models`) or any timm model name.")]
CheckpointOpt = Annotated[str | None, typer.Option(
    "--checkpoint", envvar="IPBENCH_CHECKPOINT", show_envvar=True,
    help="Local weights file (.safetensors or .pth, timm key names), loaded strictly. "
         "Without it, timm's pretrained download (cached by the hub client) is used.")]
WeightsOpt = Annotated[Weights, typer.Option(
    "--weights",
    help="Without --checkpoint: timm's pretrained weights, or 'random' (timm's initialisation, seeded by "
         "--seed) for GMACs and speed where no weights are at hand; accuracy is then meaningless.")]
DataOpt = Annotated[str, typer.Option(
    "--data", envvar="IPBENCH_DATA", show_envvar=True,
    help="'sample' (100 labelled photographs shipped with ipbench), an ImageNet-style validation folder (one "
         "sub-folder per wnid), a CSV with columns file,label (paths relative to the CSV), webdataset tar "
         "shards ('val-{000000..000063}.tar'), or 'synthetic' (random images: speed only, no accuracy).")]
LimitOpt = Annotated[int | None, typer.Option(
    "--limit", min=1,
    help="Use N images evenly spaced over the sorted list (deterministic, all classes represented); "
         "for synthetic data, the number of images (default 256).")]
SkipBadOpt = Annotated[bool, typer.Option(
    "--skip-bad", help="Skip unreadable images and report how many, instead of stopping with an error.")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="Where the model runs.")]
AmpDtypeOpt = Annotated[Precision, typer.Option(
    "--amp-dtype", "--dtype",
    help="Autocast precision: float32 (none), bfloat16 (CPU/CUDA) or float16 (CUDA); weights stay float32 "
         "(timm validate.py's --amp-dtype; --dtype is the older name).")]
ModelDtypeOpt = Annotated[Precision, typer.Option(
    "--model-dtype", help="Cast the weights and the inputs to this dtype (timm validate.py's --model-dtype).")]
ThreadsOpt = Annotated[int | None, typer.Option(
    "--threads", min=1, help="torch CPU threads (torch.set_num_threads); default: torch's own choice.")]
SeedOpt = Annotated[int, typer.Option(
    "--seed", help="Random seed (synthetic images, random weights, anything random).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per batch.")]
WorkersOpt = Annotated[int, typer.Option(
    "--workers", min=0, help="Image-decoding worker processes (0 decodes in the main process).")]
ImgSizeOpt = Annotated[int | None, typer.Option(
    "--img-size", min=8,
    help="Run the model at this resolution on the same weights: timm resamples the position embedding "
         "(bicubic) and the images are resized and cropped to it.")]
PatchSizeOpt = Annotated[int | None, typer.Option(
    "--patch-size", min=2,
    help="Run the model with this patch size on the same weights: timm resamples the patch embedding "
         "(FlexiViT's resize) and the position embedding.")]
OutOpt = Annotated[Path, typer.Option(
    "--out", "-o", help="Folder for the result CSVs (each command appends to its own <command>.csv).")]
ForceOpt = Annotated[bool, typer.Option(
    "--force", help="Measure rows already in the CSV again (appends newer rows) instead of resuming.")]
ReducersOpt = Annotated[list[str] | None, typer.Option(
    "--reducers", "-r",
    help="Reducer specs separated by commas (or the option repeated): 'tome,evit', "
         "'evit:keep=0.7,fuse=false,imagepiece:r=k/2'. A piece with '=' continues the spec before it.")]

# name -> (annotation, default) of every shared run option, in --help order
SHARED: dict[str, tuple[Any, Any]] = {
    "model": (ModelOpt, "deit_t"),
    "checkpoint": (CheckpointOpt, None),
    "weights": (WeightsOpt, Weights.pretrained),
    "data": (DataOpt, "sample"),
    "limit": (LimitOpt, None),
    "skip_bad": (SkipBadOpt, False),
    "device": (DeviceOpt, Device.cpu),
    "amp_dtype": (AmpDtypeOpt, Precision.float32),
    "model_dtype": (ModelDtypeOpt, Precision.float32),
    "threads": (ThreadsOpt, None),
    "seed": (SeedOpt, 0),
    "batch_size": (BatchOpt, 32),
    "workers": (WorkersOpt, DEFAULT_WORKERS),
    "img_size": (ImgSizeOpt, None),
    "patch_size": (PatchSizeOpt, None),
}


def _value(v: Any) -> Any:
    return v.value if isinstance(v, Enum) else v


def run_options(exclude: tuple[str, ...] = (), **defaults: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the shared run options to a command; it receives them as ``run: RunSpec``.

    `exclude` leaves options out (their RunSpec defaults apply); `defaults` changes a default. A
    command that declares a shared option itself (another help text) keeps its own declaration and
    still gets the value in its RunSpec.
    """
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn)  # annotations as written (strings); `run` names a type-checking import
        hints = {k: eval(v, fn.__globals__) if isinstance(v, str) else v  # noqa: S307 - our own annotations
                 for k, v in fn.__annotations__.items() if k not in ("run", "return")}
        own = [p.replace(annotation=hints[p.name]) for p in sig.parameters.values() if p.name != "run"]
        names = {p.name for p in own}
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                   default=defaults.get(name, default))
                 for name, (annotation, default) in SHARED.items() if name not in exclude and name not in names]
        shared = {p.name for p in added} | (names & set(SHARED))

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            from ipbench.runs.context import RunSpec

            values = {k: _value(kwargs[k]) for k in shared}
            for k in shared - names:
                kwargs.pop(k)
            return fn(run=RunSpec(**values), **kwargs)

        params = added + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        wrapper.__signature__ = sig.replace(parameters=params, return_annotation=None)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate


# -- list options, parsed once at the edge ------------------------------------------------------

def parse_keep_rates(text: str) -> list[float]:
    """``0.9,0.8,0.7`` → floats in (0, 1]."""
    rates = []
    for piece in (p.strip() for p in text.split(",")):
        try:
            rate = float(piece)
        except ValueError:
            raise UserError(f"bad --keep-rates value {piece!r}: expected numbers in (0, 1] "
                            "separated by commas, e.g. 0.9,0.7,0.5") from None
        if not 0.0 < rate <= 1.0 or math.isnan(rate):
            raise UserError(f"bad --keep-rates value {piece!r}: a keep rate must be in (0, 1]")
        rates.append(rate)
    return list(dict.fromkeys(rates))


def parse_batch_sizes(text: str) -> list[int]:
    """``1,8,64,256`` → positive ints, in the order given, each once."""
    values = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece.isdigit() or int(piece) < 1:
            raise UserError(f"bad --batch-sizes value {piece!r}: expected integers >= 1 separated by commas, "
                            "e.g. 1,8,64,256")
        values.append(int(piece))
    return list(dict.fromkeys(values))


def parse_tome_r(text: str) -> list[int]:
    """``8,13,16`` → non-negative ints."""
    values = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece.isdigit():
            raise UserError(f"bad --tome-r value {piece!r}: expected integers >= 0 separated by "
                            "commas, e.g. 8,13,16")
        values.append(int(piece))
    return list(dict.fromkeys(values))


def parse_budgets(text: str) -> list[float]:
    """``0.75`` or ``0.9,0.75`` → positive GMACs budgets."""
    budgets = []
    for piece in (p.strip() for p in text.split(",")):
        try:
            value = float(piece)
        except ValueError:
            value = float("nan")
        if not value > 0:
            raise UserError(f"bad --match-gmacs value {piece!r}: expected GMACs per image > 0, e.g. 0.75")
        budgets.append(value)
    return list(dict.fromkeys(budgets))


def policies(values: list[str] | None, default: str) -> list[Any]:
    """The ``--reducers`` option as policies, parsed once (a bad spec is a one-line error)."""
    from ipbench.reducers import parse_specs

    found = parse_specs(values or [default])
    if not found:
        raise UserError("--reducers: no reducer given")
    return found


def parse_sizes(text: str, option: str, minimum: int) -> list[int]:
    """``12,16,24`` → distinct integers >= `minimum`, in the order given."""
    sizes = []
    for piece in (p.strip() for p in text.split(",")):
        try:
            size = int(piece)
        except ValueError:
            raise UserError(f"bad {option} value {piece!r}: expected integers separated by commas") from None
        if size < minimum:
            raise UserError(f"bad {option} value {size}: must be at least {minimum}")
        sizes.append(size)
    return list(dict.fromkeys(sizes))
