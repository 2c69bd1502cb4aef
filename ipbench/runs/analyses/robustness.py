"""`ipbench robustness`: top-1 under random 16×16 masks (paper Table 4).

Each image gets its own mask generator seeded by (seed, image index), so the baseline and every
reducer see exactly the same masked images, whatever the batch size or the order of the runs.
One row per (reducer, mask count); rows already in robustness.csv are skipped.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ipbench.errors import UserError
from ipbench.reducers import Policy
from ipbench.results import ROBUSTNESS_COLUMNS, accuracy_fields
from ipbench.runs.analyses import common
from ipbench.runs.analyses.masking import (
    DEFAULT_COUNTS,
    FILLS,
    PLACEMENTS,
    check_count,
    image_generators,
    mask_count_for,
    mask_images,
)
from ipbench.runs.context import RunSpec
from ipbench.runs.loop import Accuracy, Job, Predictions, Transform
from ipbench.runs.plan import BASELINE, config, variant
from ipbench.runs.progress import Progress

DEFAULT_REDUCERS = "tome:r=13,evit,imagepiece"


def check_options(masks: str | None, mask: float | None, placement: str, fill: str) -> list[int] | None:
    """Validate the mask options before anything loads; the counts of --masks (None for --mask)."""
    if masks is not None and mask is not None:
        raise UserError("--mask (a fraction of the patches) and --masks (counts) exclude each other")
    if placement not in PLACEMENTS:
        raise UserError(f"unknown --placement {placement!r}; valid: {', '.join(PLACEMENTS)}")
    if fill not in FILLS:
        raise UserError(f"unknown --fill {fill!r}; valid: {', '.join(FILLS)}")
    if mask is not None:
        mask_count_for(mask, 1 << 30)  # range check only
        return None
    counts = common.parse_ints(masks, "--masks") if masks is not None else list(DEFAULT_COUNTS)
    bad = [c for c in counts if c < 1]
    if bad:
        raise UserError(f"--masks: a mask count must be at least 1, got {bad[0]}")
    return counts


def masker(count: int, placement: str, fill: str, seed: int, patch: int) -> Transform:
    """The input transform of one mask count: image i's masks come from its own (seed, i) generator."""
    def transform(x: Tensor, indices: range) -> Tensor:
        return mask_images(x, count, placement, fill, image_generators(seed, indices), patch)[0]

    return transform


def run(spec: RunSpec, out: Path, policies: list[Policy], counts: list[int] | None, fraction: float | None,
        placement: str, fill: str, force: bool = False, progress: Progress | None = None) -> common.Outcome:
    """Measure every reducer (and the baseline) at every mask count; write one row each."""
    csv_path, done = common.start(spec, out, "robustness", ROBUSTNESS_COLUMNS, progress)
    base = with_baseline(policies)
    run = common.load(spec, "robustness", progress, accuracy=True)
    done = common.resume_state(run.ctx, done)
    pe = run.net.patch_embed
    n_patches, patch = int(pe.num_patches), int(pe.patch_size[0])
    if tuple(pe.patch_size) != (16, 16):
        raise UserError(f"the masks are 16x16 squares of the paper; this model's patches are {tuple(pe.patch_size)}")
    if counts is None:
        assert fraction is not None
        counts = [mask_count_for(fraction, n_patches)]
    for c in counts:
        check_count(c, n_patches, placement)

    outcome = common.Outcome(csv_path=csv_path, run=run)
    if run.ctx.accuracy_note:
        outcome.notes.append(run.ctx.accuracy_note)
    seed = spec.seed
    for policy in base:
        keys = {c: run.key("robustness", policy.spec, mask_count=c, placement=placement, fill=fill, seed=seed)
                for c in counts}
        cfg = config(run.net, policy)
        model = variant(run.net, policy)
        for c in counts:
            if not force and keys[c] in done:
                outcome.rows.append(done[keys[c]])
                outcome.resumed += 1
                continue
            acc, records = Accuracy(), Predictions()
            run.run([Job(policy.spec, model, [acc, records], transform=masker(c, placement, fill, seed, patch))],
                    f"{policy.label()} · {c} masks")
            res = acc.result
            row = {
                **run.row_fields(cfg, keys[c]),
                "mask_count": c,
                "mask_fraction": round(c / n_patches, 4),
                "placement": placement,
                "fill": fill,
                **accuracy_fields(res.correct1, res.correct5, res.total),
            }
            run.write(csv_path, row, ROBUSTNESS_COLUMNS, records)
            outcome.rows.append(row)
            outcome.measured += 1
    return outcome


def with_baseline(policies: list[Policy]) -> list[Policy]:
    """The baseline first (always measured), then the reducers in order, each once."""
    from ipbench.reducers import parse_spec

    seen = {BASELINE: parse_spec(BASELINE)}
    for p in policies:
        seen.setdefault(p.spec, p)
    return list(seen.values())
