"""What a configuration costs: GMACs (fvcore, with the analytic count beside it) and throughput.

`ipbench flops` and `ipbench speed` are here, and the pieces the sweep shares with them: the
fvcore count with its analytic fallback, the fixed batch of real images that is timed, and the
speed columns of a row.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ipbench import results
from ipbench.measure import footprint
from ipbench.measure.flops import count_gmacs
from ipbench.measure.throughput import SpeedProtocol, SpeedResult, measure_grouped
from ipbench.reducers import Policy, reducible
from ipbench.runs.context import RunContext, RunSpec, open_run
from ipbench.runs.plan import BASELINE, Config, Costs, Variants, config, mean_gmacs
from ipbench.runs.progress import Progress, Silent

FLOPS_AGREEMENT = 0.01  # fvcore and the analytic count must agree within 1 %
# a paired speed-up whose rounds spread wider than this, (max - min) / median, is flagged: the
# machine was busy and the number should not be trusted (a 2-core CPU shows 15-35 % when busy)
SPREAD_WARNING = 0.25
ANALYTIC_COUNTER = "analytic"  # flop_counter of a row whose model fvcore could not trace
# flop_counter of an image-adaptive reducer's row: the mean of every image's analytic GMACs from its
# measured counts (fvcore on one traced batch would count the padding of its longest image)
ADAPTIVE_COUNTER = "analytic-per-image-mean"


def measured_gmacs(model: nn.Module, images: Tensor, label: str, analytic: float | None,
                   log: Any) -> tuple[Any, str]:
    """fvcore's count (+ SDPA handle) and its counter name; the analytic count where fvcore fails.

    A reducer whose forward torch.jit cannot trace would otherwise stop a whole run; its row then
    says ``flop_counter=analytic`` and a warning names the cause. `log(message)` gets warnings.
    """
    try:
        fv = count_gmacs(model, images)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        detail = detail.split("traceable): ", 1)[-1].split(", please report", 1)[0]
        log(f"warning: {label}: fvcore could not trace the model (torch.jit: {detail[:120]}); "
            f"its GMACs are the analytic count (flop_counter={ANALYTIC_COUNTER})")
        return ("" if analytic is None else analytic), ANALYTIC_COUNTER
    if fv.unknown_ops:
        log(f"warning: {label}: no MAC count for {', '.join(fv.unknown_ops)} (counted as 0)")
    if analytic is not None and abs(fv.gmacs - analytic) > FLOPS_AGREEMENT * analytic:
        log(f"warning: {label}: fvcore {fv.gmacs:.4f} vs analytic {analytic:.4f} GMACs differ by "
            f"more than {100 * FLOPS_AGREEMENT:g} %")
    return fv.gmacs, fv.counter


def fixed_batch(images: Tensor, batch_size: int) -> Tensor:
    """`batch_size` images: the first ones, repeated in order when the data has fewer."""
    if len(images) >= batch_size:
        return images[:batch_size]
    return images.repeat(math.ceil(batch_size / len(images)), 1, 1, 1)[:batch_size]


def speed_fields(r: SpeedResult | None, protocol: SpeedProtocol) -> dict[str, Any]:
    """The speed columns of a row (empty when speed was not measured)."""
    if r is None:
        return {}
    return {
        "img_s_median": round(r.images_per_s, 2), "img_s_min": round(r.images_per_s_min, 2),
        "img_s_max": round(r.images_per_s_max, 2), "speedup_median": round(r.speedup, 4),
        "speedup_min": round(r.speedup_min, 4), "speedup_max": round(r.speedup_max, 4),
        "repeats": protocol.repeats, "min_seconds": protocol.min_seconds, "compile": protocol.compile,
        "latency_ms_median": results.cell(r.latency_ms, 3), "latency_ms_p90": results.cell(r.latency_ms_p90, 3),
        "peak_mem_mib": results.cell(r.peak_mib, 2), "attention_backend": r.attention,
        "compile_mode": protocol.compile_mode if protocol.compile else "",
        "compiled_graphs": r.compiled_graphs, "recompiles": r.recompiles, **footprint.runtime_versions(r.device),
    }


def spread_note(speeds: dict[str, SpeedResult], labels: dict[str, str] | None = None) -> str | None:
    """A warning when some speed-up's rounds spread wider than SPREAD_WARNING (busy machine)."""
    wide = {spec: (r.speedup_max - r.speedup_min) / r.speedup for spec, r in speeds.items()
            if r.speedup > 0 and spec != BASELINE and r.speedup_max - r.speedup_min > SPREAD_WARNING * r.speedup}
    if not wide:
        return None
    worst = max(wide, key=lambda s: wide[s])
    name = (labels or {}).get(worst, worst)
    return (f"timings unsteady: {len(wide)} speed-up(s) spread over more than {100 * SPREAD_WARNING:g} % of their "
            f"median between rounds (worst: {name}, {100 * wide[worst]:.0f} %); the machine was busy: rerun the "
            "speed on an idle machine or with more --repeats before trusting those numbers")


def speed_estimate(n_models: int, protocol: SpeedProtocol) -> float:
    """Seconds the timing will take at least: every model, in each of its group's rounds and
    warm-up, runs for --min-seconds (the baseline once per group)."""
    others = max(0, n_models - 1)
    size = protocol.group if protocol.group > 0 else max(1, others)
    groups = max(1, math.ceil(others / size))
    return (n_models + groups - 1) * (protocol.repeats + 1) * protocol.min_seconds


def time_configs(ctx: RunContext, nets: dict[str, nn.Module], batch: Tensor, protocol: SpeedProtocol,
                 progress: Progress) -> dict[str, SpeedResult]:
    """Interleaved throughput of every model (keyed by spec, the baseline among them) on one batch."""
    eta = speed_estimate(len(nets), protocol)
    what = f"the baseline and {len(nets) - 1} configuration(s), interleaved"
    progress.log(f"timing {what}: at least {eta / 60:.1f} min "
                 f"({protocol.repeats} rounds of >= {protocol.min_seconds:g} s each); rows follow")
    progress.phase(f"throughput, {what}", None)
    return measure_grouped(nets, ctx.inputs(batch), BASELINE, protocol, ctx.device, ctx.spec.amp_dtype,
                           progress.set_done)


@dataclass
class CostOutcome:
    """Rows written by flops or speed."""

    ctx: RunContext
    csv_path: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _configs(ctx: RunContext, policies: list[Policy]) -> list[Config]:
    costs = Costs(ctx.net) if reducible(ctx.net) else None
    specs = dict.fromkeys([BASELINE, *(p.spec for p in policies)])
    by_spec = {p.spec: p for p in policies}
    return [config(ctx.net, by_spec.get(s, s), costs) for s in specs]


def run_flops(spec: RunSpec, policies: list[Policy], images: int, out: Path,
              progress: Progress | None = None) -> CostOutcome:
    """GMACs per image (fvcore + SDPA handle, on real images) and the analytic count, per reducer."""
    progress = progress or Silent()
    csv_path = results.prepare_csv(out, "flops", results.SWEEP_COLUMNS)
    ctx = open_run(spec, source_limit=images)
    configs = _configs(ctx, policies)
    variants = Variants(ctx.net)
    x = ctx.inputs(ctx.first_images(images))
    outcome = CostOutcome(ctx=ctx, csv_path=csv_path)
    base = None
    progress.phase("GMACs (fvcore)", len(configs))
    for c in configs:
        gm, counter = measured_gmacs(variants(c.policy), x, c.label, c.gmacs, progress.log)
        base = base or gm
        row = {
            **ctx.row_fields(), "num_images": len(x), "batch_size": len(x),
            "config_key": results.config_key({"command": "flops", **ctx.identity(), "reducer": c.spec,
                                              "images": len(x)}),
            **c.fields(), "gmacs_analytic": round(c.gmacs, 4) if c.gmacs is not None else "",
            "gmacs": round(gm, 4), "flop_counter": counter, "gmacs_ratio": round(base / gm, 4),
        }
        results.append_row(csv_path, row, results.SWEEP_COLUMNS)
        outcome.rows.append(row)
        progress.advance(1, c.label)
        analytic = "n/a" if c.gmacs is None else f"{c.gmacs:.4f}"
        progress.row_written(f"row: {c.label}: {gm:.4f} GMACs ({counter}; analytic {analytic})")
    return outcome


def run_speed(spec: RunSpec, policies: list[Policy], protocol: SpeedProtocol, out: Path,
              progress: Progress | None = None, batch_sizes: list[int] | None = None) -> CostOutcome:
    """Interleaved throughput of the baseline and every reducer on a fixed batch of real images,
    at each of `batch_sizes` (default: the protocol's one) in turn: every configuration is timed
    against the baseline AT THAT batch size, and each (configuration, batch size) is one row."""
    progress = progress or Silent()
    sizes = list(dict.fromkeys(batch_sizes or [protocol.batch_size]))
    csv_path = results.prepare_csv(out, "speed", results.SWEEP_COLUMNS)
    ctx = open_run(spec, source_limit=max(sizes))
    configs = _configs(ctx, policies)
    variants = Variants(ctx.net)
    uint8 = ctx.first_images(max(sizes))
    nets = {c.spec: variants(c.policy) for c in configs}
    outcome = CostOutcome(ctx=ctx, csv_path=csv_path)
    base = configs[0].gmacs
    for size in sizes:
        at = dataclasses.replace(protocol, batch_size=size)
        if len(sizes) > 1:
            progress.log(f"batch size {size}")
        res = time_configs(ctx, nets, fixed_batch(uint8, size), at, progress)
        unsteady = spread_note(res, {c.spec: c.label for c in configs})
        if unsteady:
            outcome.notes.append(f"batch {size}: {unsteady}" if len(sizes) > 1 else unsteady)
        for c in configs:
            row = {
                **ctx.row_fields(), "num_images": min(len(uint8), size), "batch_size": size,
                "config_key": results.config_key({"command": "speed", **ctx.identity(), "reducer": c.spec,
                                                  "threads": ctx.threads, **at.key_fields()}),
                **c.fields(), "gmacs_analytic": round(c.gmacs, 4) if c.gmacs is not None else "",
                "gmacs_ratio": round(base / c.gmacs, 4) if base and c.gmacs else "",
                **speed_fields(res[c.spec], at),
            }
            results.append_row(csv_path, row, results.SWEEP_COLUMNS)
            outcome.rows.append(row)
            r = res[c.spec]
            progress.row_written(f"row: {c.label}, batch {size}: {r.images_per_s:.1f} img/s, {r.speedup:.2f}x, "
                                 f"{r.latency_ms:.1f} ms")
    return outcome


def adaptive_fields(model: nn.Module, n_in: int, rows: list[list[int]]) -> dict[str, Any]:
    """What a row says about an image-adaptive reducer, from every image's counts: the mean tokens
    after each block (2 decimals), the mean final count, and the mean of the images' analytic GMACs
    (the per-image average, the convention of ATS and LTMP); plus the final count's min and max."""
    if not rows:
        return {}
    means = [sum(column) / len(rows) for column in zip(*rows)]
    finals = [r[-1] for r in rows]
    return {"tokens_per_layer": " ".join(f"{m:.2f}" for m in means), "final_tokens": round(means[-1], 2),
            "gmacs_mean": mean_gmacs(model, n_in, rows), "final_min": min(finals), "final_max": max(finals)}
