"""What every analysis command shares: the run context with its images decoded once, row fields and
keys, resume, traced passes through the one batch loop, and the trace analyses' driver.

Images are decoded once (uint8) and every reducer runs on the same tensor, one reducer after the
other, so rows are written as soon as a reducer is done and an interrupted run resumes at the
reducer it stopped in. Under torchrun each rank decodes its shard; the probe image, the resume
decision and the accumulated counts are the same on every rank, and rank 0 writes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ipbench import results
from ipbench.data import batched
from ipbench.errors import UserError
from ipbench.reducers import Policy
from ipbench.reducers.trace import Trace, get_trace
from ipbench.runs.context import RunContext, RunSpec, open_run
from ipbench.runs.loop import Forward, Job, Merged, Predictions, run_jobs
from ipbench.runs.plan import BASELINE, Config, config, require_reducible, variant
from ipbench.runs.progress import Progress, Silent


@dataclass
class AnalysisRun:
    """A run context and the images it is measured on (decoded once, kept for every reducer)."""

    ctx: RunContext
    images: Tensor  # uint8 [N, C, H, W]: this rank's shard (all images in a single process)
    labels: Tensor
    progress: Progress = field(default_factory=Silent)
    first: Tensor | None = None  # the first image of ALL images (the probe's), uint8 [1, C, H, W]

    @property
    def num_images(self) -> int:
        """Decoded images over every rank: what rows and keys count."""
        return self.ctx.kept if self.ctx.kept is not None else len(self.images)

    @property
    def net(self) -> nn.Module:
        return self.ctx.net

    @property
    def has_labels(self) -> bool:
        return self.ctx.source.has_labels

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        return batched(self.images, self.labels, self.ctx.spec.batch_size)

    def key(self, command: str, spec: str, **extra: Any) -> str:
        """config_key of one row: the command, the run's identity, the reducer and the row's own
        coordinates (layer, mask count, ...)."""
        return results.config_key({"command": command, **self.ctx.identity(), "num_images": self.num_images,
                                   "reducer": spec, **extra})

    def row_fields(self, cfg: Config, key: str) -> dict[str, Any]:
        """The fields every analysis row carries (who, on what, with which reducer, where)."""
        return {**self.ctx.row_fields(), "config_key": key, "num_images": self.num_images, **cfg.fields()}

    def write(self, csv_path: Path, row: dict[str, Any], columns: list[str], records: Predictions | None = None
              ) -> None:
        """Append one row, after its per-image `records` if it has them, so that a row always has its
        file (rank 0 only: under torchrun every rank holds the same totals)."""
        if self.ctx.world.main:
            if records is not None:
                results.write_predictions(csv_path.parent, row["config_key"], *records.records())
            results.append_row(csv_path, row, columns)

    def run(self, jobs: list[Job], description: str) -> None:
        """One pass of `jobs` over every image, with a progress phase."""
        self.progress.phase(description, len(self.images))
        run_jobs(self.ctx, self.batches(), jobs, self.progress, expected=self.num_images)

    def probe(self, model: nn.Module) -> Trace:
        """The trace of the first image (the same on every rank): cheap, tells whether a reducer
        merges at all."""
        with torch.inference_mode(), self.ctx.precision():
            model(self.ctx.inputs(self.first_image))
        return get_trace(model)

    @property
    def first_image(self) -> Tensor:
        return self.first if self.first is not None else self.images[:1]


def load(spec: RunSpec, what: str, progress: Progress | None = None, accuracy: bool = False) -> AnalysisRun:
    """The model and ALL images decoded once (a progress phase while decoding); an analysis that
    measures `accuracy` needs labels that index the model's classes (checked before decoding)."""
    progress = progress or Silent()
    ctx = open_run(spec)
    require_reducible(ctx.model, ctx.net, f"{what} measures token reducers on a ViT")
    if accuracy and not ctx.source.has_labels:
        raise UserError(f"{what} measures accuracy: it needs labelled images (an ImageNet-style folder, a "
                        "file,label CSV or tar shards), not synthetic data")
    if accuracy:
        ctx.check_labels()
    images, labels = ctx.decode(progress, f"{what}: decode")
    first = ctx.world.broadcast(images[:1]) if ctx.world.distributed else None
    return AnalysisRun(ctx=ctx, images=images, labels=labels, progress=progress, first=first)


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


@dataclass
class Outcome:
    """What a command did: rows (new and resumed, in table order), notes, the CSV, and how many
    rows were measured now or read back from an earlier run."""

    csv_path: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    measured: int = 0
    resumed: int = 0
    run: AnalysisRun | None = None


def start(spec: RunSpec, out: Path, command: str, columns: list[str], progress: Progress | None
          ) -> tuple[Path, dict[str, dict[str, str]]]:
    """The checks every analysis makes before loading anything: the output folder and its CSV."""
    csv_path = results.prepare_csv(out, command, columns)
    return csv_path, results.rows_by_key(csv_path)


def resume_state(ctx: RunContext, done: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """Rank 0's reading of what is already done, on every rank (torchrun): one decision for all."""
    return ctx.world.broadcast(done)


class Analysis(Merged):
    """One reducer's accumulation over traced batches (a consumer of the batch loop); subclasses say
    what a row is, and name in `merged` the attributes that hold their (mergeable) counts and sums.

    `skip_reason` sees a one-image trace first: it says whether there is anything to measure and
    sets `layers` (the blocks with rows), so that the keys of every row are known before the pass.
    """

    command = ""

    def __init__(self, run: AnalysisRun, policy: Policy) -> None:
        self.run, self.policy = run, policy
        self.layers: list[int] = []

    def skip_reason(self, probe: Trace) -> str | None:
        """Why this reducer has nothing to measure, or None (and set `layers`)."""
        raise NotImplementedError

    def row_keys(self) -> list[str]:
        """config_key of every row this reducer will write."""
        raise NotImplementedError

    def add(self, out: Forward) -> None:
        raise NotImplementedError

    def rows(self, cfg: Config) -> list[dict[str, Any]]:
        """Every row of this reducer (per block, then the pooled "all" rows), each with its key."""
        raise NotImplementedError

    def key(self, **extra: Any) -> str:
        return self.run.key(self.command, self.policy.spec, **extra)


def run_traced(spec: RunSpec, out: Path, command: str, columns: list[str], policies: list[Policy], force: bool,
               make: Callable[[AnalysisRun, Policy], Analysis], progress: Progress | None = None) -> Outcome:
    """Trace every reducer over all images and write its rows (reducers already done are skipped,
    their rows read back for the table)."""
    csv_path, done = start(spec, out, command, columns, progress)
    run = load(spec, command, progress)
    done = resume_state(run.ctx, done)
    outcome = Outcome(csv_path=csv_path, run=run)
    for policy in policies:
        analysis = make(run, policy)
        label = policy.label()
        if policy.name == BASELINE:
            outcome.notes.append(f"{label}: no reduction, nothing to measure: skipped")
            continue
        cfg = config(run.net, policy)
        model = variant(run.net, policy, tracing=True)
        reason = analysis.skip_reason(run.probe(model))
        if reason is not None:
            outcome.notes.append(f"{label}: {reason}: skipped")
            continue
        keys = analysis.row_keys()
        if not force and keys and all(k in done for k in keys):
            outcome.rows.extend(done[k] for k in keys)
            outcome.resumed += len(keys)
            continue
        run.run([Job(policy.spec, model, [analysis], traced=True)], f"{command}: {label}")
        for row in analysis.rows(cfg):
            outcome.rows.append(row)
            if force or row["config_key"] not in done:
                run.write(csv_path, row, columns)
                outcome.measured += 1
            else:
                outcome.resumed += 1
    return outcome
