"""`ipbench sweep`: reducers × keep rates (or GMACs budgets) → accuracy, GMACs, throughput rows.

How a sweep runs, and why:

* Configurations come from the static token plan (`ipbench.runs.plan`): each reducer's keep rate
  (or budget) is turned into its own parameter, as its policy declares, before anything runs.
* Every configuration is a weight-sharing copy of the ONE loaded model, patched on its own.
* GMACs: fvcore (+ SDPA handle) on one real image, with the analytic count beside it.
* Throughput: every pending configuration interleaved with the baseline on a fixed batch of real
  images (paired speed-up ratios), in groups of a few configurations.
* Accuracy: the images are decoded once. When they fit in ``max_decoded_mib``, configurations
  are evaluated one after another on the decoded tensor and each row is written (flush + fsync)
  as soon as its accuracy is complete: Ctrl-C loses at most the configuration in progress.
  Larger data is streamed once with every pending configuration run on each batch, and the rows
  are written at the end of that pass.
* Resume: a configuration whose ``config_key`` is already in the CSV is skipped (``force``
  measures again and appends; readers take the last row of a key).
* Under torchrun: rank 0 decides what to resume (broadcast), counts the GMACs and times the speed
  ALONE while the other ranks wait (papers quote one GPU's speed, never a sum over GPUs, and
  ranks timing at once would share the host); then every rank evaluates its shard and rank 0
  writes each row from the counts of all ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipbench import results
from ipbench.data import batched
from ipbench.measure.accuracy import Result
from ipbench.measure.throughput import SpeedProtocol, SpeedResult
from ipbench.reducers import Policy
from ipbench.runs.context import RunContext, RunSpec, open_run
from ipbench.runs.cost import (
    ADAPTIVE_COUNTER,
    adaptive_fields,
    fixed_batch,
    measured_gmacs,
    speed_fields,
    spread_note,
    time_configs,
)
from ipbench.runs.loop import Accuracy, Job, Predictions, TokenTally, run_jobs
from ipbench.runs.plan import BASELINE, Config, Costs, Variants, plan_sweep, require_reducible
from ipbench.runs.progress import Progress, Silent

DEFAULT_MAX_DECODED_MIB = 2048


@dataclass
class SweepRequest:
    """What to sweep: the policies, and the keep rates, ToMe r values or budgets that drive them."""

    policies: list[Policy]
    keep_rates: list[float] | None = None
    knob_values: list[int] | None = None  # --tome-r
    budgets: list[float] | None = None  # --match-gmacs
    speed: SpeedProtocol = field(default_factory=SpeedProtocol)
    measure_speed: bool = True
    force: bool = False
    max_decoded_mib: int = DEFAULT_MAX_DECODED_MIB


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


def _notes(configs: list[Config]) -> list[str]:
    """What the reducers ask to be said beside their numbers (training-free, re-implemented)."""
    parts = {p.name: type(p).note for c in configs for p in c.policy.parts}
    return [f"{name}: {note}" for name, note in parts.items() if note]


def run_sweep(spec: RunSpec, req: SweepRequest, out: Path, progress: Progress | None = None) -> SweepReport:
    """Measure every configuration not yet in ``out/sweep.csv`` and append its row."""
    progress = progress or Silent()
    csv_path = results.prepare_csv(out, "sweep", results.SWEEP_COLUMNS)
    ctx = open_run(spec)
    require_reducible(ctx.model, ctx.net, "the sweep compares token reducers on a ViT")
    ctx.check_labels()
    policies = [p for p in req.policies if p.name != BASELINE]
    adaptive = any(p.adaptive for p in policies)
    probe = ctx.inputs(fixed_batch(ctx.first_images(spec.batch_size), spec.batch_size)) if adaptive else None
    configs = plan_sweep(Costs(ctx.net, probe), policies, req.keep_rates, req.knob_values, req.budgets)
    for c in configs:
        c.key = results.config_key({
            "command": "sweep", **ctx.identity(), "reducer": c.spec, "keep_rate": c.keep_rate,
            # threads change the speed, never a count: a --no-speed row is the same under torchrun
            "gmacs_budget": c.gmacs_budget, "threads": ctx.threads if req.measure_speed else None,
            "speed": req.speed.key_fields() if req.measure_speed else None,
        })
    done = ctx.world.broadcast(set() if req.force else results.existing_keys(csv_path))
    pending = [c for c in configs if c.key not in done]
    notes = _notes(configs)
    if ctx.accuracy_note and ctx.source.has_labels:
        notes.insert(0, ctx.accuracy_note)
    report = SweepReport(csv_path=csv_path, rows=[], measured=len(pending), skipped=len(configs) - len(pending),
                         accuracy_skipped=not ctx.source.has_labels, notes=notes, model=ctx.model,
                         data=ctx.source.path)
    if pending:
        report.notes.extend(_measure(ctx, req, configs[0], pending, csv_path, progress))
        report.skipped_images = list(ctx.skipped)
    report.rows = results.last_rows(csv_path, [c.key for c in configs])
    return report


def _keep_text(c: Config) -> str:
    if c.gmacs_budget is not None:
        return f" @ {c.gmacs_budget:g} GMACs"
    shown = c.keep_rate is None or f"keep={c.keep_rate:g}" in c.label
    return "" if shown else f" (keep {c.keep_rate:g})"


def _measure(ctx: RunContext, req: SweepRequest, baseline: Config, pending: list[Config], csv_path: Path,
             progress: Progress) -> list[str]:
    """Measure the pending configurations and write their rows; return what to tell the user."""
    bs = ctx.spec.batch_size
    by_spec: dict[str, list[Config]] = {}
    for c in pending:
        by_spec.setdefault(c.spec, []).append(c)
    first_of = {spec: cs[0] for spec, cs in by_spec.items()}
    first_of.setdefault(BASELINE, baseline)
    variants = Variants(ctx.net)
    nets = {BASELINE: ctx.net, **{spec: variants(c.policy) for spec, c in first_of.items()}}
    labelled = ctx.source.has_labels
    tallies = {spec: TokenTally() for spec, c in first_of.items() if c.policy.adaptive}
    decoded = None
    if labelled and ctx.fits_in_memory(req.max_decoded_mib * 2**20):
        decoded = ctx.decode(progress, "decoding images", req.max_decoded_mib * 2**20)
    gmacs: dict[str, Any] = {}
    counters: dict[str, str] = {}
    speeds: dict[str, SpeedResult] = {}
    if ctx.world.main:  # GMACs are counted once; speed is timed by rank 0 alone while the others wait
        first = decoded[0][:bs] if decoded is not None and not ctx.world.distributed else ctx.first_images(bs)
        real = fixed_batch(first, bs)
        progress.phase("GMACs (fvcore)", len(nets))
        x1 = ctx.inputs(real[:1])
        for spec, model in nets.items():
            c = first_of[spec]
            if spec in tallies and labelled:  # counts vary by image: the row's GMACs are its images' mean,
                gmacs[spec], counters[spec] = c.gmacs, ADAPTIVE_COUNTER  # from `write` (no fvcore trace to drop)
            else:  # (without labels an adaptive row keeps fvcore's count of one image, not compared)
                analytic = None if spec in tallies else c.gmacs
                gmacs[spec], counters[spec] = measured_gmacs(model, x1, c.label, analytic, progress.log)
            progress.advance(1, c.label)
        if req.measure_speed:
            speeds = time_configs(ctx, nets, real, req.speed, progress)
    ctx.world.broadcast(None)
    unsteady = spread_note(speeds, {spec: c.label for spec, c in first_of.items()})
    notes = [unsteady] if unsteady else []

    def write(spec: str, res: Result | None, records: Predictions | None = None) -> None:
        if not ctx.world.main:
            return
        measured = adaptive_fields(ctx.net, first_of[spec].plan.n_in, tallies[spec].rows) if spec in tallies else {}
        if measured:  # counts vary by image: the row's tokens and GMACs are the per-image means
            gmacs[spec] = measured.pop("gmacs_mean")
            budget = first_of[spec].gmacs_budget
            calibrated = f"; --match-gmacs calibrated it on the first {bs} images" if budget is not None else ""
            notes.append(f"{first_of[spec].label}: tokens per image vary; final tokens {measured.pop('final_min')}"
                         f"-{measured.pop('final_max')} (mean {measured['final_tokens']:g}); tokens and GMACs "
                         f"are per-image means{calibrated}")
        for c in by_spec[spec]:
            if records is not None:  # the per-image records first: a row always has its file
                results.write_predictions(csv_path.parent, c.key, *records.records())
            row = {
                **ctx.row_fields(), "config_key": c.key, **c.fields(),
                "num_images": res.images if res is not None else "",
                "keep_rate": results.cell(c.keep_rate, 6), "gmacs_budget": results.cell(c.gmacs_budget, 6),
                **measured, "gmacs": round(gmacs[spec], 4),
                "gmacs_analytic": round(gmacs[spec] if measured else c.gmacs, 4) if c.gmacs is not None else "",
                "flop_counter": counters[spec], "gmacs_ratio": round(gmacs[BASELINE] / gmacs[spec], 4),
                **speed_fields(speeds.get(spec), req.speed),
            }
            if res is not None:
                row.update(results.accuracy_fields(res.correct1, res.correct5, res.total))
            results.append_row(csv_path, row, results.SWEEP_COLUMNS)
            top1 = "" if res is None or res.top1 is None else f", top-1 {res.top1:.1f}"
            speed = f", {speeds[spec].speedup:.2f}x" if spec in speeds else ""
            progress.row_written(f"row: {c.label}{_keep_text(c)}: {gmacs[spec]:.3f} GMACs{top1}{speed}")

    def _tally(spec: str) -> list[TokenTally]:
        return [tallies[spec]] if spec in tallies else []

    specs = list(by_spec)
    if not labelled:
        for spec in specs:
            write(spec, None)
        return notes
    if decoded is not None:
        images, labels = decoded
        for spec in specs:
            acc, records = Accuracy(), Predictions()
            progress.phase(f"accuracy {first_of[spec].label}", len(labels))
            run_jobs(ctx, batched(images, labels, bs), [Job(spec, nets[spec], [acc, records, *_tally(spec)])],
                     progress, expected=ctx.kept)
            write(spec, acc.result, records)
        return notes
    progress.phase(f"accuracy, {len(specs)} configurations per batch", ctx.source.num_images)
    accs = {spec: Accuracy() for spec in specs}
    records = {spec: Predictions() for spec in specs}
    run_jobs(ctx, ctx.source.batches(bs, ctx.spec.workers),
             [Job(s, nets[s], [accs[s], records[s], *_tally(s)]) for s in specs], progress)
    for spec in specs:
        write(spec, accs[spec].result, records[spec])
    return notes
