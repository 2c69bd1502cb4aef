"""`ipbench eval`: top-1/top-5 of one model, with or without a token reducer, on a data source.

Any timm classifier runs without a reducer (a ResNet's accuracy is a fine baseline); a reducer
needs a timm ViT. One row per run is appended to eval.csv (eval does not resume: every run is a
measurement of its own). Under torchrun each rank streams its shard of the images and rank 0
writes the row of the counts added up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipbench import results
from ipbench.measure.accuracy import Result
from ipbench.reducers import Policy
from ipbench.runs.context import RunContext, RunSpec, open_run
from ipbench.runs.cost import adaptive_fields
from ipbench.runs.loop import Accuracy, Job, Predictions, TokenTally, run_jobs
from ipbench.runs.plan import config, variant
from ipbench.runs.progress import Progress, Silent


@dataclass
class EvalOutcome:
    """What eval measured and wrote."""

    ctx: RunContext
    row: dict[str, Any]
    result: Result
    seconds: float
    csv_path: Path
    notes: list[str] = field(default_factory=list)


def run_eval(spec: RunSpec, reducer: Policy, out: Path, progress: Progress | None = None) -> EvalOutcome:
    """Evaluate `reducer` on the spec's model and data; append one row to OUT/eval.csv."""
    progress = progress or Silent()
    csv_path = results.prepare_csv(out, "eval", results.EVAL_COLUMNS)
    ctx = open_run(spec)
    ctx.check_labels()
    cfg = config(ctx.net, reducer)
    acc, predictions, tally = Accuracy(), Predictions(), TokenTally()
    progress.phase("eval", ctx.source.num_images)
    start = time.perf_counter()
    job = Job(cfg.spec, variant(ctx.net, reducer), [acc, predictions, tally])
    run_jobs(ctx, ctx.source.batches(spec.batch_size, spec.workers), [job], progress)
    seconds = time.perf_counter() - start
    res = acc.result
    fields = cfg.fields()
    measured = adaptive_fields(ctx.net, cfg.plan.n_in, tally.rows) if cfg.plan is not None and tally.rows else {}
    notes = [ctx.accuracy_note] if ctx.accuracy_note and ctx.source.has_labels else []
    if measured:  # counts vary by image: tokens are the per-image means
        fields.update(tokens_per_layer=measured["tokens_per_layer"], final_tokens=measured["final_tokens"])
        notes.append(f"tokens per image vary: final tokens {measured['final_min']}-{measured['final_max']} "
                     f"(mean {measured['final_tokens']:g}), {measured['gmacs_mean']:.4f} GMACs per image on average")
    row = {
        **ctx.row_fields(),
        "config_key": results.config_key({"command": "eval", **ctx.identity(), "reducer": cfg.spec}),
        "num_images": res.images,
        "skipped_images": len(ctx.skipped),
        "reducer": cfg.spec,
        "reducer_params": fields["reducer_params"],
        "reducer_label": fields["reducer_label"],
        "training_free": fields["training_free"],
        "tokens_per_layer": fields["tokens_per_layer"],
        "final_tokens": fields["final_tokens"],
        **results.accuracy_fields(res.correct1, res.correct5, res.total),
    }
    if ctx.world.main:
        results.write_predictions(out, row["config_key"], *predictions.records())
        results.append_row(csv_path, row, results.EVAL_COLUMNS)
    return EvalOutcome(ctx=ctx, row=row, result=res, seconds=seconds, csv_path=csv_path, notes=notes)
