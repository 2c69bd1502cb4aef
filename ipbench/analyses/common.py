"""What every analysis command shares: the model and decoded images, reducer variants, row
fields, resume by config key, traced passes with a progress bar, and short labels.

Images are decoded once (uint8) and every reducer runs on the same tensor, one reducer after
the other on the ONE loaded model (patched, measured, unpatched), so rows are written as soon
as a reducer is done and an interrupted run resumes at the reducer it stopped in.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich import box
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from ipbench import models, results
from ipbench.data import SYNTHETIC, DataSource, batched, decode_all, normalize, open_source
from ipbench.errors import UserError
from ipbench.measure.accuracy import progress_bar
from ipbench.models import ReducerInfo
from ipbench.reducers import apply_reducer, parse_spec, remove_reducer, token_plan
from ipbench.reducers.policy import Policy, format_value
from ipbench.reducers.trace import Trace, get_trace

BASELINE = "none"
MAX_DECODED_BYTES = 4 << 30  # 1000 images at 224 px are 150 MB; --limit beyond this


@dataclass
class Settings:
    """The options every analysis command takes."""

    model: str = "deit_t"
    checkpoint: str | None = None
    data: str = SYNTHETIC
    limit: int | None = None
    reducers: list[str] = field(default_factory=list)
    batch_size: int = 32
    device: str = "cpu"
    threads: int | None = None
    workers: int = 0
    seed: int = 0
    out: Path = Path("results")
    force: bool = False
    progress: bool = True


@dataclass
class Setup:
    """A loaded model and the decoded images it is measured on."""

    settings: Settings
    net: nn.Module  # plain timm (patched only while a reducer is measured)
    timm_name: str
    checkpoint: str  # resolved path or hub:<id>
    sha256: str  # full sha256 of the weights file, "" for hub weights
    source: DataSource
    images: Tensor  # uint8 [N, C, H, W]
    labels: Tensor

    @property
    def has_labels(self) -> bool:
        return self.source.has_labels

    def key_fields(self) -> dict[str, Any]:
        """What identifies the model, weights and images in a config key."""
        return {"model": self.timm_name, "checkpoint": self.sha256 or self.checkpoint,
                "data": self.source.path, "num_images": len(self.images), "device": self.settings.device}

    def batches(self) -> Iterator[tuple[int, Tensor, Tensor]]:
        """(index of the first image, normalised float batch on the device, labels)."""
        s = self.settings
        start = 0
        for images, labels in batched(self.images, self.labels, s.batch_size):
            yield start, normalize(images.to(s.device), self.source.mean, self.source.std), labels
            start += len(images)


def load(s: Settings, what: str) -> Setup:
    """The model and ALL images decoded once (a progress bar while decoding)."""
    if s.device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device cuda: CUDA is not available on this machine (torch {torch.__version__}); "
                        "use --device cpu")
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    net = models.create_model(s.model, s.checkpoint, device=s.device)
    source = open_source(s.data, net, limit=s.limit, seed=s.seed)
    images, labels = decode(source, s.batch_size, s.workers, s.progress, what)
    sha = models.checkpoint_sha256(s.checkpoint) if s.checkpoint else ""
    hub_id = net.pretrained_cfg.get("hf_hub_id") or s.model
    ckpt = str(Path(s.checkpoint).resolve()) if s.checkpoint else f"hub:{hub_id}"
    return Setup(settings=s, net=net, timm_name=models.resolve_name(s.model), checkpoint=ckpt, sha256=sha,
                 source=source, images=images, labels=labels)


def decode(source: DataSource, batch_size: int, workers: int, progress: bool, what: str) -> tuple[Tensor, Tensor]:
    """Every image of `source` as one uint8 tensor (kept for all reducers and passes)."""
    with passes(progress) as bar:
        task = bar.add_task(f"{what}: decode", total=source.num_images)
        return decode_all(source, MAX_DECODED_BYTES, batch_size, workers,
                          lambda n: bar.advance(task, n))


class _Silent:
    """The progress interface, doing nothing (tests)."""

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def advance(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def passes(progress: bool) -> Any:
    """A progress bar (images per pass, img/s, ETA on stderr) used as a context manager."""
    return progress_bar() if progress else _Silent()


# -- reducers -----------------------------------------------------------------------------------

def reducer_specs(values: list[str] | None, default: str) -> list[str]:
    """Canonical specs of ``--reducers`` (comma separated or repeated), in order, without repeats."""
    from ipbench.calibrate import split_specs

    texts = split_specs(values or [default])
    if not texts:
        raise UserError("--reducers: no reducer given")
    return list(dict.fromkeys(parse_spec(t).spec for t in texts))


def parts(policy: Policy) -> list[Policy]:
    """The single policies of a spec (``a+b`` has two)."""
    return list(getattr(policy, "parts", [policy]))


def short_label(spec: str) -> str:
    """A spec with only its keep rate / ToMe's r and the parameters off their defaults."""
    out = []
    for part in parts(parse_spec(spec)):
        defaults = {p.name: p.default for p in type(part).PARAMS}
        shown = {k: v for k, v in part.params.items()
                 if k == "keep" or (k == "r" and part.name == "tome") or defaults.get(k) != v}
        if part.name == "tome" and isinstance(shown.get("r"), list) and len(set(shown["r"])) == 1:
            shown["r"] = shown["r"][0]
        out.append(part.name + (":" + ",".join(f"{k}={format_value(v)}" for k, v in shown.items())
                                if shown else ""))
    return "+".join(out)


class Patched:
    """``with Patched(net, spec, tracing) as info:`` the model runs the reducer, then plain timm again."""

    def __init__(self, net: nn.Module, spec: str, tracing: bool = False) -> None:
        self.net, self.spec, self.tracing = net, spec, tracing

    def __enter__(self) -> ReducerInfo:
        policy = parse_spec(self.spec)
        if policy.name != BASELINE or self.tracing:
            apply_reducer(self.net, policy, tracing=self.tracing)
        return ReducerInfo(spec=policy.spec, name=policy.name, params=dict(policy.params),
                           training_free=bool(policy.training_free),
                           tokens_per_layer=list(token_plan(self.net, policy).after))

    def __exit__(self, *exc: object) -> None:
        remove_reducer(self.net)


def traced_pass(setup: Setup, bar: Any, description: str,
                on_batch: Callable[[Trace, Tensor, Tensor], None]) -> None:
    """Run the (patched, tracing) model over every image; hand each batch's trace, logits and
    labels to `on_batch`. Tracing reads the same evidence the reducer does: outputs are unchanged."""
    task = bar.add_task(description, total=len(setup.images))
    with torch.inference_mode():
        for _, x, labels in setup.batches():
            logits = setup.net(x)
            on_batch(get_trace(setup.net), logits.float().cpu(), labels)
            bar.advance(task, len(labels))


def probe_trace(setup: Setup) -> Trace:
    """The trace of ONE image: cheap, tells whether a reducer merges at all."""
    x = normalize(setup.images[:1].to(setup.settings.device), setup.source.mean, setup.source.std)
    with torch.inference_mode():
        setup.net(x)
    return get_trace(setup.net)


# -- rows ---------------------------------------------------------------------------------------

def row_fields(setup: Setup, info: ReducerInfo, key: str) -> dict[str, Any]:
    """The fields every analysis row carries (who, on what, with which reducer, where)."""
    s = setup.settings
    return {
        **results.common_fields(s.device, "float32", s.batch_size, s.threads, s.seed),
        "config_key": key,
        "model": setup.timm_name,
        "checkpoint": setup.checkpoint,
        "checkpoint_sha256": setup.sha256[:16],
        "data": setup.source.path,
        "num_images": len(setup.images),
        "reducer": info.name,
        "reducer_spec": info.spec,
        "reducer_params": info.params_json,
        "training_free": info.training_free,
        "tokens_per_layer": " ".join(map(str, info.tokens_per_layer)),
        "final_tokens": info.final_tokens,
    }


def row_key(setup: Setup, command: str, spec: str, **extra: Any) -> str:
    """config_key of one row: the command, model, weights, images, reducer and the row's own
    coordinates (layer, mask count, ...)."""
    return results.config_key({"command": command, **setup.key_fields(), "reducer": spec, **extra})


def existing_keys(path: Path) -> set[str]:
    """config_key of every row already in a result CSV."""
    if not path.exists():
        return set()
    with path.open(newline="", encoding="utf-8") as f:
        return {row["config_key"] for row in csv.DictReader(f) if row.get("config_key")}


def rows_by_key(path: Path) -> dict[str, dict[str, str]]:
    """The last row of each config_key in a result CSV (a --force re-run appends a newer one)."""
    if not path.exists():
        return {}
    with path.open(newline="", encoding="utf-8") as f:
        return {row["config_key"]: row for row in csv.DictReader(f) if row.get("config_key")}



def rounded(value: float | None, digits: int) -> Any:
    """A number for a CSV cell: rounded, or empty when not available (nan/None)."""
    if value is None or value != value:
        return ""
    return round(float(value), digits)


def parse_floats(text: str, option: str) -> list[float]:
    """``0,0.5,1`` → [0.0, 0.5, 1.0]; a one-line UserError naming the option otherwise."""
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"{option}: expected numbers separated by commas, got {text!r}") from None
    if not values:
        raise UserError(f"{option}: no value given")
    return list(dict.fromkeys(values))


def parse_ints(text: str, option: str) -> list[int]:
    """``7,10,15`` → [7, 10, 15]; a one-line UserError naming the option otherwise."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"{option}: expected integers separated by commas, got {text!r}") from None
    if not values:
        raise UserError(f"{option}: no value given")
    return list(dict.fromkeys(values))


# -- output -------------------------------------------------------------------------------------

def console() -> Console:
    """stdout, at least 140 columns wide: the paper-shaped tables must not fold their numbers."""
    c = Console()
    return Console(width=max(140, c.width)) if c.width < 140 else c


def table(title: str, columns: list[str], caption: str | None = None) -> Table:
    """A rich table: the first column left-aligned (labels), the others right-aligned (numbers)."""
    t = Table(title=title, caption=caption, box=box.SIMPLE_HEAVY, caption_justify="left")
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i == 0 else "right", overflow="fold", no_wrap=i == 0)
    return t


def training_free_note(setup: Setup) -> str:
    """Every output says what the paper's numbers are not: these models are not trained with reduction."""
    return (f"training-free: reducers applied to off-the-shelf weights of {setup.timm_name}; the paper's numbers "
            "come from models trained with each method")


@dataclass
class Outcome:
    """What a command did: rows (new and resumed, in table order), notes, the CSV, and how many
    rows were measured now or read back from an earlier run."""

    csv_path: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    measured: int = 0
    resumed: int = 0
    setup: Setup | None = None


# -- the trace analyses (similarity, importance, attentiveness) ------------------------------

class Analysis:
    """One reducer's accumulation over traced batches; subclasses say what a row is.

    `skip_reason` sees a one-image trace first: it says whether there is anything to measure and
    sets `layers` (the blocks with rows), so that the keys of every row are known before the pass.
    """

    command = ""

    def __init__(self, setup: Setup, spec: str) -> None:
        self.setup, self.spec = setup, spec
        self.layers: list[int] = []

    def skip_reason(self, probe: Trace) -> str | None:
        """Why this reducer has nothing to measure, or None (and set `layers`)."""
        raise NotImplementedError

    def row_keys(self) -> list[str]:
        """config_key of every row this reducer will write."""
        raise NotImplementedError

    def add(self, trace: Trace, logits: Tensor, labels: Tensor) -> None:
        raise NotImplementedError

    def rows(self, info: ReducerInfo) -> list[dict[str, Any]]:
        """Every row of this reducer (per block, then the pooled "all" rows), each with its key."""
        raise NotImplementedError

    def key(self, **extra: Any) -> str:
        return row_key(self.setup, self.command, self.spec, **extra)


def run_traced(s: Settings, command: str, columns: list[str], default_reducers: str,
               make: Callable[[Setup, str], Analysis]) -> Outcome:
    """Trace every reducer over all images and write its rows (reducers already done are skipped,
    their rows read back for the table)."""
    csv_path = s.out / f"{command}.csv"
    results.check_header(csv_path, columns)
    specs = reducer_specs(s.reducers, default_reducers)
    setup = load(s, command)
    out = Outcome(csv_path=csv_path, setup=setup)
    done = rows_by_key(csv_path)
    with passes(s.progress) as bar:
        for spec in specs:
            analysis = make(setup, spec)
            label = short_label(spec)
            if spec == BASELINE:
                out.notes.append(f"{label}: no reduction, nothing to measure: skipped")
                continue
            with Patched(setup.net, spec, tracing=True) as info:
                reason = analysis.skip_reason(probe_trace(setup))
                if reason is not None:
                    out.notes.append(f"{label}: {reason}: skipped")
                    continue
                keys = analysis.row_keys()
                if not s.force and keys and all(k in done for k in keys):
                    out.rows.extend(done[k] for k in keys)
                    out.resumed += len(keys)
                    continue
                traced_pass(setup, bar, f"{command}: {label}", analysis.add)
                for row in analysis.rows(info):
                    out.rows.append(row)
                    if s.force or row["config_key"] not in done:
                        results.append_row(csv_path, row, columns)
                        out.measured += 1
                    else:
                        out.resumed += 1
    return out
