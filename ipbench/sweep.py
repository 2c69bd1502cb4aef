"""`ipbench sweep` (and `flops`, `speed`): reducers × keep rates → accuracy, GMACs, throughput rows.

How a sweep runs, and why:

* Configurations come from the static token plan (`ipbench.calibrate`): each reducer's keep rate
  (or GMACs budget) is turned into its own parameter before anything runs.
* Every configuration is a copy of the ONE loaded model that shares its weight tensors and is
  patched on its own (class swap), so K configurations cost K small module trees, not K models.
* GMACs: fvcore (+ SDPA handle) on one real image, with the analytic count beside it.
* Throughput: every pending configuration interleaved with the baseline on a fixed batch of real
  images (paired speed-up ratios), in groups of a few configurations (`measure_grouped`), each
  group one `measure_throughput` call with the baseline in it.
* Accuracy: the images are decoded once. When they fit in ``max_decoded_mib``, configurations
  are evaluated one after another on the decoded tensor and each row is written (flush + fsync)
  as soon as its accuracy is complete: Ctrl-C loses at most the configuration in progress.
  Larger data is streamed once with every pending configuration run on each batch, and the rows
  are written at the end of that pass.
* Resume: a configuration whose ``config_key`` is already in the CSV is skipped (``force``
  measures again and appends; readers take the last row of a key).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import functools
import itertools
import json
import math
import statistics
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from torch import Tensor, nn

from ipbench import models, results
from ipbench.calibrate import (
    Item,
    Static,
    calibrate,
    fill,
    make_item,
    split_specs,
    static,
    tome_r_for_keep,
    tome_r_max,
)
from ipbench.data import DataSource, batched, decode_all, normalize, open_source
from ipbench.errors import UserError
from ipbench.measure.accuracy import Result, evaluate
from ipbench.measure.flops import count_gmacs
from ipbench.measure.throughput import SpeedResult, measure_throughput, resolve_dtype
from ipbench.models import ReducerInfo, prepare_reducer
from ipbench.reducers.policy import format_value

BASELINE = "none"
DEFAULT_KEEP_RATES = (0.9, 0.8, 0.7, 0.6, 0.5)
DEFAULT_MAX_DECODED_MIB = 2048
DEFAULT_SPEED_GROUP = 4  # reducers timed per interleaved group with the baseline
FLOPS_AGREEMENT = 0.01  # fvcore and the analytic count must agree within 1 %
ANALYTIC_COUNTER = "analytic"  # flop_counter of a row whose model fvcore could not trace

# Said beside every table that shows these reducers (METHODS.md: training-free numbers and
# re-implementations must be labelled as such in every output).
NOTES = {
    "imagepiece": "imagepiece: training-free on off-the-shelf weights (the paper's models are trained)",
    "mstm": "mstm: re-implemented from the paper's abstract (no public code)",
}


# ---------------------------------------------------------------------------------------------
# option parsing


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


def check_precision(device: str, dtype: str) -> None:
    """float16 on CPU is not supported by torch's autocast: say so before anything loads."""
    if dtype == "float16" and not device.startswith("cuda"):
        raise UserError("--dtype float16 needs --device cuda; on CPU use bfloat16 or float32")


def precision(device: str, dtype: str) -> contextlib.AbstractContextManager:
    """Autocast for reduced precision (weights stay float32), as `measure_throughput` times it."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=resolve_dtype(dtype))


# ---------------------------------------------------------------------------------------------
# configurations


@dataclass
class SweepConfig:
    """One row of the sweep: a reducer spec and the nominal keep rate / budget it stands for."""

    reducer: str  # policy name ("none" for the baseline)
    spec: str  # canonical spec
    static: Static
    keep_rate: float | None = None
    gmacs_budget: float | None = None
    key: str = ""

    @property
    def label(self) -> str:
        return short_spec(self.static)


KNOB_PARAMS = {"keep": None, "r": "tome"}  # shown in a short spec even at their default (for this reducer)


def short_spec(s: Static) -> str:
    """The spec with its keep rate / r and the parameters that differ from their defaults."""
    out = []
    for part in getattr(s.policy, "parts", [s.policy]):
        defaults = {p.name: p.default for p in type(part).PARAMS}
        shown = {k: v for k, v in part.params.items()
                 if (k in KNOB_PARAMS and KNOB_PARAMS[k] in (None, part.name)) or defaults.get(k) != v}
        r = shown.get("r")
        if part.name == "tome" and isinstance(r, list) and r and len(set(r)) == 1:
            shown["r"] = r[0]
        elif part.name == "tome" and isinstance(r, list) and r:
            shown["r"] = "/".join(f"{v}x{len(list(g))}" for v, g in itertools.groupby(r))
        out.append(part.name + (":" + ",".join(f"{k}={format_value(v)}" for k, v in shown.items())
                                if shown else ""))
    return "+".join(out)


def plan_sweep(model: nn.Module, items: list[Item], keep_rates: list[float] | None = None,
               tome_r: list[int] | None = None, budgets: list[float] | None = None) -> list[SweepConfig]:
    """The sweep's configurations, the baseline first, from the static plan only (no image runs).

    Keep rates: evit/topk/imagepiece/mstm (any part with a free ``keep``) get ``keep=ρ``; ToMe
    gets the constant r whose analytic GMACs are closest to EViT's at ρ, or each of ``tome_r``.
    Budgets: every item's parameter is calibrated to each budget (`ipbench.calibrate`). Items that
    fix their own parameter run once as given.
    """
    configs = [SweepConfig(reducer=BASELINE, spec=BASELINE, static=static(model, BASELINE))]

    def add(item: Item, spec: str, keep: float | None = None, budget: float | None = None) -> None:
        s = static(model, spec)
        configs.append(SweepConfig(reducer=s.policy.name, spec=s.spec, static=s, keep_rate=keep,
                                   gmacs_budget=budget))

    fixed = [i for i in items if i.knob == "fixed"]
    if budgets:
        if fixed:
            raise UserError(f"--match-gmacs: {fixed[0].text} fixes its parameters (keep= or tome's r=); "
                            "leave the one to calibrate out of the spec")
        for budget in budgets:
            for item in items:
                add(item, calibrate(model, item, budget).spec, budget=budget)
        return _unique(configs)
    rates = list(keep_rates or DEFAULT_KEEP_RATES)
    if tome_r and not any(i.knob == "tome_r" for i in items):
        raise UserError("--tome-r sets ToMe's r, but --reducers has no tome whose r is free")
    if tome_r and max(tome_r) > tome_r_max(model):
        raise UserError(f"bad --tome-r value {max(tome_r)}: ToMe merges at most half of the "
                        f"{model.patch_embed.num_patches} patch tokens per block, r <= {tome_r_max(model)}")
    by_keep = [i for i in items if i.knob == "keep" or (i.knob == "tome_r" and not tome_r)]
    for keep in rates:
        for item in by_keep:
            value = tome_r_for_keep(model, keep, item) if item.knob == "tome_r" else keep
            add(item, fill(item, value), keep=keep)
    for item in items:
        if item.knob == "tome_r" and tome_r:
            for r in tome_r:
                add(item, fill(item, r))
    for item in fixed:
        add(item, item.text, keep=_keep_of(static(model, item.text)))
    return _unique(configs)


def _keep_of(s: Static) -> float | None:
    """The keep rate a fixed spec gives itself (its first part that has one), else None."""
    return next((p.params["keep"] for p in getattr(s.policy, "parts", [s.policy]) if "keep" in p.params), None)


def _unique(configs: list[SweepConfig]) -> list[SweepConfig]:
    seen: set[tuple[str, float | None, float | None]] = set()
    out = []
    for c in configs:
        ident = (c.spec, c.keep_rate, c.gmacs_budget)
        if ident not in seen:
            seen.add(ident)
            out.append(c)
    return out


# ---------------------------------------------------------------------------------------------
# models, images, identity


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer with `model`.

    Patching is a class swap on the module objects, so each configuration needs its own module
    tree, but never its own weights: K configurations of DeiT-B cost K·(a few KiB), not K·344 MB.
    """
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def variant(model: nn.Module, spec: str) -> tuple[nn.Module, ReducerInfo]:
    """`model` itself for the baseline (plain timm), else a weight-sharing copy patched with `spec`."""
    if spec == BASELINE:
        return model, prepare_reducer(model, BASELINE)
    clone = shared_copy(model)
    return clone, prepare_reducer(clone, spec)


@dataclass(frozen=True)
class Identity:
    """What every row says about the model, its weights and the data."""

    model: str  # timm name
    checkpoint: str
    sha256: str
    data: str
    num_images: int  # images in the (limited) source

    def fields(self) -> dict[str, Any]:
        return {"model": self.model, "checkpoint": self.checkpoint, "checkpoint_sha256": self.sha256[:16],
                "data": self.data}

    def key_fields(self) -> dict[str, Any]:
        return {"model": self.model, "checkpoint": self.sha256 or self.checkpoint, "data": self.data,
                "num_images": self.num_images}


def identity(net: nn.Module, model: str, checkpoint: str | None, source: DataSource) -> Identity:
    sha = models.checkpoint_sha256(checkpoint) if checkpoint else ""
    hub_id = net.pretrained_cfg.get("hf_hub_id") or model
    ckpt = str(Path(checkpoint).resolve()) if checkpoint else f"hub:{hub_id}"
    return Identity(model=models.resolve_name(model), checkpoint=ckpt, sha256=sha, data=source.path,
                    num_images=source.num_images)


def fixed_batch(images: Tensor, batch_size: int) -> Tensor:
    """`batch_size` images: the first ones, repeated in order when the data has fewer."""
    if len(images) >= batch_size:
        return images[:batch_size]
    return images.repeat(math.ceil(batch_size / len(images)), 1, 1, 1)[:batch_size]


def first_images(source: DataSource, n: int, workers: int) -> Tensor:
    """The first `n` decoded images of a source (uint8)."""
    for images, _ in source.batches(n, workers):
        return images
    raise UserError(f"no readable image in {source.path}")


# ---------------------------------------------------------------------------------------------
# the one progress display


class Display:
    """One rich display for a whole command: the rows done, and the phase in progress."""

    def __init__(self, total_rows: int, what: str = "sweep") -> None:
        self.progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.overall = self.progress.add_task(f"{what}: rows", total=total_rows, detail="")
        self.phase = self.progress.add_task("", total=None, detail="")

    def __enter__(self) -> Display:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def start_phase(self, description: str, total: int | None) -> None:
        self.progress.reset(self.phase, total=total, description=description, detail="")
        if not self.progress.console.is_terminal:  # a log file gets no live bars: say what runs
            self.progress.console.print(f"{description} ...", highlight=False)

    def advance(self, n: int = 1, detail: str | None = None) -> None:
        self.progress.advance(self.phase, n)
        if detail is not None:
            self.progress.update(self.phase, detail=detail)

    def set_done(self, done: int, total: int, detail: str) -> None:
        self.progress.update(self.phase, completed=done, total=total, detail=detail)

    def row_written(self, message: str) -> None:
        self.progress.advance(self.overall)
        self.progress.console.print(message, soft_wrap=True, highlight=False)

    def log(self, message: str) -> None:
        self.progress.console.print(message, soft_wrap=True, highlight=False)


def _counting(batches: Iterable[tuple[Tensor, Tensor]], advance: Callable[[int], None]
              ) -> Iterator[tuple[Tensor, Tensor]]:
    for images, labels in batches:
        yield images, labels
        advance(len(labels))


# ---------------------------------------------------------------------------------------------
# rows


@dataclass
class SpeedSettings:
    """How throughput is measured (all of it goes into the rows and the config key)."""

    batch_size: int = 32
    repeats: int = 5
    min_seconds: float = 2.0
    warmup: int = 2
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    compile: bool = False
    group: int = DEFAULT_SPEED_GROUP  # models timed with each baseline group; 0 = all in one group

    def key_fields(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "repeats": self.repeats, "min_seconds": self.min_seconds,
                "warmup": self.warmup, "compile": self.compile, "group": self.group}


def _shifted(progress: Callable[[int, int, str], None], offset: int, total: int, done: int, _total: int,
             what: str) -> None:
    progress(offset + done, total, what)


def measure_grouped(nets: dict[str, nn.Module], images: Tensor, speed: SpeedSettings,
                    progress: Callable[[int, int, str], None] | None = None) -> dict[str, SpeedResult]:
    """Throughput of every model, interleaved with the baseline, in groups of `speed.group` models.

    On a busy machine the speed changes within seconds; a round of 21 models lasts a minute, so a
    model and the baseline timing it is paired with would be far apart. In groups of a few models
    (a keep rate's reducers) every model is paired with a baseline timed seconds before or after.
    The baseline's own numbers pool its rounds of all groups.
    """
    others = [n for n in nets if n != BASELINE]
    size = speed.group if speed.group > 0 else max(1, len(others))
    chunks = [others[i:i + size] for i in range(0, len(others), size)] or [[]]
    total = sum((len(c) + 1) * (1 + speed.repeats) for c in chunks)
    offset = 0
    out: dict[str, SpeedResult] = {}
    baseline_runs: list[SpeedResult] = []
    for chunk in chunks:
        res = measure_throughput(
            {BASELINE: nets[BASELINE], **{n: nets[n] for n in chunk}}, images, baseline=BASELINE,
            repeats=speed.repeats, min_seconds=speed.min_seconds, warmup=speed.warmup, device=speed.device,
            dtype=speed.dtype, compile=speed.compile,
            progress=None if progress is None else functools.partial(_shifted, progress, offset, total))
        offset += (len(chunk) + 1) * (1 + speed.repeats)
        out.update({n: res[n] for n in chunk})
        baseline_runs.append(res[BASELINE])
    seconds = tuple(t for r in baseline_runs for t in r.round_seconds)
    ips = [baseline_runs[0].batch_size / t for t in seconds]
    out[BASELINE] = dataclasses.replace(
        baseline_runs[0], images_per_s=statistics.median(ips), images_per_s_min=min(ips),
        images_per_s_max=max(ips), round_seconds=seconds, round_ratios=(1.0,) * len(seconds))
    return {n: out[n] for n in nets}


def _round(value: float | None, digits: int) -> Any:
    return "" if value is None else round(value, digits)


def reducer_fields(s: Static) -> dict[str, Any]:
    policy = s.policy
    return {
        "reducer": policy.name,
        "reducer_spec": s.spec,
        "reducer_params": json.dumps(policy.params, sort_keys=True, separators=(",", ":")),
        "training_free": bool(policy.training_free),
        "tokens_per_layer": " ".join(map(str, s.plan.after)),
        "final_tokens": s.plan.final,
        "gmacs_analytic": round(s.gmacs, 4),
    }


def speed_fields(r: SpeedResult | None, speed: SpeedSettings) -> dict[str, Any]:
    if r is None:
        return {}
    return {
        "img_s_median": round(r.images_per_s, 2),
        "img_s_min": round(r.images_per_s_min, 2),
        "img_s_max": round(r.images_per_s_max, 2),
        "speedup_median": round(r.speedup, 4),
        "speedup_min": round(r.speedup_min, 4),
        "speedup_max": round(r.speedup_max, 4),
        "repeats": speed.repeats,
        "min_seconds": speed.min_seconds,
        "compile": speed.compile,
    }


def accuracy_fields(res: Result | None) -> dict[str, Any]:
    if res is None:
        return {}
    return {"num_images": res.images, "top1": _round(res.top1, 3), "top5": _round(res.top5, 3),
            "correct1": res.correct1 if res.total else "", "correct5": res.correct5 if res.total else ""}


def existing_keys(path: Path) -> set[str]:
    """config_key of every complete row already in a result CSV."""
    if not path.exists():
        return set()
    with path.open(newline="", encoding="utf-8") as f:
        return {row["config_key"] for row in csv.DictReader(f) if row.get("config_key")}


def last_rows(path: Path, keys: Iterable[str]) -> list[dict[str, str]]:
    """The last row of each key, in the order of `keys` (a --force re-run appends a newer row)."""
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        by_key = {row["config_key"]: row for row in csv.DictReader(f)}
    return [by_key[k] for k in keys if k in by_key]



# ---------------------------------------------------------------------------------------------
# the sweep


@dataclass
class SweepSettings:
    """Everything `ipbench sweep` was asked to do."""

    model: str = "deit_t"
    checkpoint: str | None = None
    data: str = "synthetic"
    limit: int | None = None
    skip_bad: bool = False
    reducers: list[str] = field(default_factory=lambda: ["tome,evit,imagepiece"])
    keep_rates: list[float] | None = None
    tome_r: list[int] | None = None
    budgets: list[float] | None = None
    speed: SpeedSettings = field(default_factory=SpeedSettings)
    measure_speed: bool = True
    workers: int = 0
    seed: int = 0
    out: Path = Path("results")
    force: bool = False
    max_decoded_mib: int = DEFAULT_MAX_DECODED_MIB
    progress: bool = True


@dataclass
class SweepReport:
    """What the sweep did: its rows (new and resumed, in sweep order) and what to tell the user."""

    csv_path: Path
    rows: list[dict[str, str]]
    measured: int
    skipped: int
    accuracy_skipped: bool
    notes: list[str]
    model: str
    data: str
    skipped_images: list[str] = field(default_factory=list)


def _mem_need(source: DataSource) -> int:
    c, h, w = source.input_size
    return source.num_images * c * h * w


def run_sweep(s: SweepSettings) -> SweepReport:
    """Measure every configuration not yet in ``out/sweep.csv`` and append its row."""
    csv_path = s.out / "sweep.csv"
    results.check_header(csv_path, results.SWEEP_COLUMNS)
    sp = s.speed
    check_precision(sp.device, sp.dtype)
    if sp.threads is not None:
        torch.set_num_threads(sp.threads)
    torch.manual_seed(s.seed)
    items = [make_item(t) for t in split_specs(s.reducers) if t.strip().lower() != BASELINE]
    net = models.create_model(s.model, s.checkpoint, device=sp.device)
    source = open_source(s.data, net, limit=s.limit, skip_bad=s.skip_bad, seed=s.seed)
    configs = plan_sweep(net, items, s.keep_rates, s.tome_r, s.budgets)
    ident = identity(net, s.model, s.checkpoint, source)
    threads = sp.threads if sp.threads is not None else torch.get_num_threads()
    for c in configs:
        c.key = results.config_key({
            "command": "sweep", **ident.key_fields(), "skip_bad": s.skip_bad, "reducer": c.spec,
            "keep_rate": c.keep_rate, "gmacs_budget": c.gmacs_budget, "device": sp.device,
            "dtype": sp.dtype, "threads": threads, "seed": s.seed,
            "speed": sp.key_fields() if s.measure_speed else None,
        })
    done = set() if s.force else existing_keys(csv_path)
    pending = [c for c in configs if c.key not in done]
    notes = [NOTES[n] for n in dict.fromkeys(p for c in configs for p in c.reducer.split("+")) if n in NOTES]
    report = SweepReport(csv_path=csv_path, rows=[], measured=len(pending), skipped=len(configs) - len(pending),
                         accuracy_skipped=not source.has_labels, notes=notes, model=ident.model, data=ident.data)
    if pending:
        _measure(s, net, source, ident, pending, csv_path, report)
    report.rows = last_rows(csv_path, [c.key for c in configs])
    return report


def _measure(s: SweepSettings, net: nn.Module, source: DataSource, ident: Identity,
             pending: list[SweepConfig], csv_path: Path, report: SweepReport) -> None:
    sp = s.speed
    by_spec: dict[str, list[SweepConfig]] = {}
    for c in pending:
        by_spec.setdefault(c.spec, []).append(c)
    specs = list(by_spec)
    nets: dict[str, nn.Module] = {BASELINE: net}
    for spec in specs:
        if spec != BASELINE:
            nets[spec] = variant(net, spec)[0]
    statics = {c.spec: c.static for c in pending}
    statics.setdefault(BASELINE, static(net, BASELINE))
    labelled = source.has_labels
    in_memory = labelled and _mem_need(source) <= s.max_decoded_mib * 2**20

    with Display(len(pending)) if s.progress else _NoDisplay() as d:
        decoded: tuple[Tensor, Tensor] | None = None
        if in_memory:
            d.start_phase("decoding images", source.num_images)
            decoded = decode_all(source, s.max_decoded_mib * 2**20, sp.batch_size, s.workers, d.advance)
            first = decoded[0][:sp.batch_size]
        else:
            first = first_images(source, sp.batch_size, s.workers)
        real = normalize(fixed_batch(first, sp.batch_size), source.mean, source.std)

        d.start_phase("GMACs (fvcore)", len(nets))
        gmacs: dict[str, float] = {}
        counters: dict[str, str] = {}
        for spec, model in nets.items():
            gmacs[spec], counters[spec] = measured_gmacs(model, real[:1].to(sp.device), statics[spec], d.log)
            d.advance(1, short_spec(statics[spec]))

        speeds: dict[str, SpeedResult] = {}
        if s.measure_speed:
            d.start_phase(f"throughput, {len(nets)} models interleaved with the baseline", None)
            speeds = measure_grouped(nets, real, sp, d.set_done)

        def write(spec: str, res: Result | None) -> None:
            common = results.common_fields(sp.device, sp.dtype, sp.batch_size, sp.threads, s.seed)
            for c in by_spec[spec]:
                row = {
                    **common, **ident.fields(), "config_key": c.key,
                    **reducer_fields(c.static),
                    "keep_rate": _round(c.keep_rate, 6), "gmacs_budget": _round(c.gmacs_budget, 6),
                    "gmacs": round(gmacs[spec], 4), "flop_counter": counters[spec],
                    "gmacs_ratio": round(gmacs[BASELINE] / gmacs[spec], 4),
                    **accuracy_fields(res), **speed_fields(speeds.get(spec), sp),
                }
                results.append_row(csv_path, row, results.SWEEP_COLUMNS)
                top1 = "" if res is None or res.top1 is None else f", top-1 {res.top1:.1f}"
                speed = f", {speeds[spec].speedup:.2f}x" if spec in speeds else ""
                d.row_written(f"row: {c.label}{_keep_text(c)}: {gmacs[spec]:.3f} GMACs{top1}{speed}")

        with precision(sp.device, sp.dtype):
            if not labelled:
                for spec in specs:
                    write(spec, None)
            elif decoded is not None:
                images, labels = decoded
                for spec in specs:
                    d.start_phase(f"accuracy {short_spec(statics[spec])}", len(labels))
                    res = evaluate({spec: nets[spec]}, _counting(batched(images, labels, sp.batch_size), d.advance),
                                   source.mean, source.std, device=sp.device, progress=False)[spec]
                    write(spec, res)
            else:
                d.start_phase(f"accuracy, {len(specs)} configurations per batch", source.num_images)
                res_all = evaluate({spec: nets[spec] for spec in specs},
                                   _counting(source.batches(sp.batch_size, s.workers), d.advance),
                                   source.mean, source.std, device=sp.device, progress=False)
                for spec in specs:
                    write(spec, res_all[spec])
    report.skipped_images = list(source.skipped)


def _keep_text(c: SweepConfig) -> str:
    if c.gmacs_budget is not None:
        return f" @ {c.gmacs_budget:g} GMACs"
    return f" (keep {c.keep_rate:g})" if c.keep_rate is not None and c.reducer == "tome" else ""


def measured_gmacs(model: nn.Module, images: Tensor, st: Static, log: Callable[[str], None]) -> tuple[float, str]:
    """fvcore's count (+ SDPA handle) and its counter name; the analytic count where fvcore fails.

    A reducer whose forward torch.jit cannot trace would otherwise stop a whole sweep; its row
    then says ``flop_counter=analytic`` and a warning names the cause.
    """
    try:
        fv = count_gmacs(model, images)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        detail = detail.split("traceable): ", 1)[-1].split(", please report", 1)[0]
        log(f"warning: {short_spec(st)}: fvcore could not trace the model (torch.jit: {detail[:120]}); "
            f"its GMACs are the analytic count (flop_counter={ANALYTIC_COUNTER})")
        return st.gmacs, ANALYTIC_COUNTER
    if fv.unknown_ops:
        log(f"warning: {short_spec(st)}: no MAC count for {', '.join(fv.unknown_ops)} (counted as 0)")
    if abs(fv.gmacs - st.gmacs) > FLOPS_AGREEMENT * st.gmacs:
        log(f"warning: {short_spec(st)}: fvcore {fv.gmacs:.4f} vs analytic {st.gmacs:.4f} GMACs differ by "
            f"more than {100 * FLOPS_AGREEMENT:g} %")
    return fv.gmacs, fv.counter


class _NoDisplay:
    """The Display interface, silent (tests, --quiet)."""

    def __enter__(self) -> _NoDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def start_phase(self, description: str, total: int | None) -> None:
        return None

    def advance(self, n: int = 1, detail: str | None = None) -> None:
        return None

    def set_done(self, done: int, total: int, detail: str) -> None:
        return None

    def row_written(self, message: str) -> None:
        return None

    def log(self, message: str) -> None:
        return None


# ---------------------------------------------------------------------------------------------
# tables


def _num(value: Any, fmt: str) -> str:
    if value in ("", None):
        return "–"
    try:
        return format(float(value), fmt)
    except ValueError:
        return str(value)


def _spread(row: dict[str, Any], stem: str, fmt: str, range_fmt: str) -> str:
    """``median (min–max)``: a timing is never one number."""
    med = row.get(f"{stem}_median", "")
    if med in ("", None):
        return "–"
    return f"{_num(med, fmt)} ({_num(row[f'{stem}_min'], range_fmt)}–{_num(row[f'{stem}_max'], range_fmt)})"


def _any(rows: list[dict[str, Any]], column: str) -> bool:
    return any(row.get(column) not in ("", None) for row in rows)


def rows_table(rows: list[dict[str, Any]], title: str, caption: str | None = None,
               columns: tuple[str, ...] = ("keep", "tokens", "gmacs", "top1", "speed")) -> Table:
    """A table of result rows (CSV rows or the dicts written): the numbers a user compares.

    Groups: keep (keep rate, budget), tokens, gmacs (fvcore), analytic, top1, speed. Columns
    whose values are all empty (no budget, accuracy skipped, --no-speed) are left out; the CSV
    holds everything else (top-5, exact counts, tokens per layer).
    """
    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD)
    table.add_column("reducer", overflow="fold", min_width=14)
    cells: list[list[str]] = [[_label(row)] for row in rows]

    def add(head: str, values: list[str]) -> None:
        # a median and its range may wrap onto two lines in a narrow terminal; nothing else wraps
        table.add_column(head, justify="right", no_wrap="(" not in head)
        for row_cells, value in zip(cells, values):
            row_cells.append(value)

    if "keep" in columns and _any(rows, "keep_rate"):
        add("keep", [_num(r.get("keep_rate"), "g") for r in rows])
    if "keep" in columns and _any(rows, "gmacs_budget"):
        add("budget", [_num(r.get("gmacs_budget"), "g") for r in rows])
    if "tokens" in columns:
        add("tokens", [str(r.get("final_tokens", "")) for r in rows])
    if "gmacs" in columns:
        add("GMACs", [_num(r.get("gmacs"), ".3f") for r in rows])
    if "analytic" in columns:
        add("analytic" if "gmacs" in columns else "GMACs", [_num(r.get("gmacs_analytic"), ".3f") for r in rows])
    if "gmacs" in columns or "analytic" in columns:
        add("ratio", [_num(r.get("gmacs_ratio"), ".2f") for r in rows])
    if "top1" in columns and _any(rows, "top1"):
        add("top-1 %", [_num(r.get("top1"), ".1f") for r in rows])
    if "speed" in columns and _any(rows, "img_s_median"):
        add("img/s (min–max)", [_spread(r, "img_s", ".1f", ".0f") for r in rows])
        add("speed-up (min–max)", [_spread(r, "speedup", ".2f", ".2f") for r in rows])
    for row_cells in cells:
        table.add_row(*row_cells)
    return table


def wide_console() -> Console:
    """stdout console; captured output (a log file, nohup) gets room for a whole table row."""
    console = Console()
    return console if console.is_terminal else Console(width=200)


def _label(row: dict[str, str]) -> str:
    try:
        return short_spec_of(row["reducer_spec"])
    except (UserError, KeyError):
        return row.get("reducer_spec") or row.get("reducer", "")


def short_spec_of(spec: str) -> str:
    """`short_spec` from a spec string (no model needed)."""
    from ipbench.reducers import parse_spec

    policy = parse_spec(spec)
    return short_spec(Static(spec=spec, policy=policy, plan=None, gmacs=0.0))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# ipbench flops / ipbench speed


def _baseline_and(specs: list[str]) -> list[str]:
    from ipbench.reducers import parse_spec

    canonical = [parse_spec(t).spec for t in specs]
    return list(dict.fromkeys([BASELINE, *canonical]))


def run_flops(model: str, checkpoint: str | None, data: str, reducers: list[str], images: int,
              device: str, threads: int | None, seed: int, out: Path, progress: bool = True
              ) -> tuple[Path, list[dict[str, Any]]]:
    """GMACs per image (fvcore + SDPA handle, on real images) and the analytic count, per reducer."""
    csv_path = out / "flops.csv"
    results.check_header(csv_path, results.SWEEP_COLUMNS)
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    specs = _baseline_and(split_specs(reducers)) if reducers else [BASELINE]
    net = models.create_model(model, checkpoint, device=device)
    source = open_source(data, net, limit=images, seed=seed)
    ident = identity(net, model, checkpoint, source)
    statics = {spec: static(net, spec) for spec in specs}
    x = normalize(first_images(source, images, 0), source.mean, source.std).to(device)
    common = results.common_fields(device, "float32", len(x), threads, seed)
    rows: list[dict[str, Any]] = []
    base = None
    with Display(len(specs), "flops") if progress else _NoDisplay() as d:
        d.start_phase("GMACs (fvcore)", len(specs))
        for spec in specs:
            st = statics[spec]
            gm, counter = measured_gmacs(variant(net, spec)[0], x, st, d.log)
            base = base or gm
            row = {
                **common, **ident.fields(), "num_images": len(x),
                "config_key": results.config_key({"command": "flops", **ident.key_fields(), "reducer": st.spec,
                                                  "images": len(x)}),
                **reducer_fields(st), "gmacs": round(gm, 4), "flop_counter": counter,
                "gmacs_ratio": round(base / gm, 4),
            }
            results.append_row(csv_path, row, results.SWEEP_COLUMNS)
            rows.append(row)
            d.advance(1, short_spec(st))
            d.row_written(f"row: {short_spec(st)}: {gm:.4f} GMACs ({counter}; analytic {st.gmacs:.4f})")
    return csv_path, rows


def flops_disagree(row: dict[str, Any]) -> bool:
    """Whether fvcore and the analytic count differ by more than 1 %."""
    fv, an = float(row["gmacs"]), float(row["gmacs_analytic"])
    return abs(fv - an) > FLOPS_AGREEMENT * an


def run_speed(model: str, checkpoint: str | None, data: str, reducers: list[str], speed: SpeedSettings,
              seed: int, out: Path, progress: bool = True) -> tuple[Path, list[dict[str, Any]]]:
    """Interleaved throughput of the baseline and every reducer on one fixed batch of real images."""
    csv_path = out / "speed.csv"
    results.check_header(csv_path, results.SWEEP_COLUMNS)
    check_precision(speed.device, speed.dtype)
    if speed.threads is not None:
        torch.set_num_threads(speed.threads)
    torch.manual_seed(seed)
    specs = _baseline_and(split_specs(reducers)) if reducers else [BASELINE]
    net = models.create_model(model, checkpoint, device=speed.device)
    source = open_source(data, net, limit=speed.batch_size, seed=seed)
    ident = identity(net, model, checkpoint, source)
    statics = {spec: static(net, spec) for spec in specs}
    nets = {spec: variant(net, spec)[0] for spec in specs}
    uint8 = first_images(source, speed.batch_size, 0)
    batch = normalize(fixed_batch(uint8, speed.batch_size), source.mean, source.std)
    threads = speed.threads if speed.threads is not None else torch.get_num_threads()
    with Display(len(specs), "speed") if progress else _NoDisplay() as d:
        d.start_phase(f"throughput, {len(nets)} models interleaved with the baseline", None)
        res = measure_grouped(nets, batch, speed, d.set_done)
        common = results.common_fields(speed.device, speed.dtype, speed.batch_size, speed.threads, seed)
        rows: list[dict[str, Any]] = []
        for spec in specs:
            st = statics[spec]
            row = {
                **common, **ident.fields(), "num_images": len(uint8),
                "config_key": results.config_key({"command": "speed", **ident.key_fields(), "reducer": st.spec,
                                                  "device": speed.device, "dtype": speed.dtype, "threads": threads,
                                                  **speed.key_fields()}),
                **reducer_fields(st), "gmacs_ratio": round(statics[BASELINE].gmacs / st.gmacs, 4),
                **speed_fields(res[spec], speed),
            }
            results.append_row(csv_path, row, results.SWEEP_COLUMNS)
            rows.append(row)
            d.row_written(f"row: {short_spec(st)}: {res[spec].images_per_s:.1f} img/s, {res[spec].speedup:.2f}x")
    return csv_path, rows
