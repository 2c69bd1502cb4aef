"""`ipbench robustness`: top-1 under random 16×16 masks (paper Table 4).

Each image gets its own mask generator seeded by (seed, image index), so the baseline and every
reducer see exactly the same masked images, whatever the batch size or the order of the runs.
One row per (reducer, mask count); rows already in robustness.csv are skipped.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ipbench.analyses import common
from ipbench.analyses.masking import (
    DEFAULT_COUNTS,
    FILLS,
    PLACEMENTS,
    check_count,
    image_generators,
    mask_count_for,
    mask_images,
)
from ipbench.errors import UserError
from ipbench.measure.accuracy import Result
from ipbench.results import ROBUSTNESS_COLUMNS, append_row, check_header

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


def add_hits(res: Result, logits: Tensor, labels: Tensor) -> None:
    """Add one batch's top-1/top-5 hits (labels < 0 are unlabelled)."""
    res.images += len(labels)
    ok = labels >= 0
    if not ok.any():
        return
    top = logits[ok].topk(min(5, logits.shape[-1]), dim=-1).indices
    hits = top == labels[ok][:, None]
    res.correct1 += int(hits[:, 0].sum())
    res.correct5 += int(hits.any(dim=-1).sum())
    res.total += int(ok.sum())


def masked_accuracy(setup: common.Setup, count: int, placement: str, fill: str, bar: Any,
                    description: str) -> Result:
    """Top-1/top-5 of the model as it is now (patched or not) on every image with `count` masks."""
    s = setup.settings
    patch = int(setup.net.patch_embed.patch_size[0])
    res = Result()
    task = bar.add_task(description, total=len(setup.images))
    with torch.inference_mode():
        for start, x, labels in setup.batches():
            gens = image_generators(s.seed, range(start, start + len(x)))
            masked, _ = mask_images(x, count, placement, fill, gens, patch)
            add_hits(res, setup.net(masked).float().cpu(), labels)
            bar.advance(task, len(labels))
    return res


def run(s: common.Settings, counts: list[int] | None, fraction: float | None, placement: str,
        fill: str) -> common.Outcome:
    """Measure every reducer (and the baseline) at every mask count; write one row each."""
    csv_path = s.out / "robustness.csv"
    check_header(csv_path, ROBUSTNESS_COLUMNS)
    specs = list(dict.fromkeys([common.BASELINE, *common.reducer_specs(s.reducers, DEFAULT_REDUCERS)]))
    setup = common.load(s, "robustness")
    if not setup.has_labels:
        raise UserError("robustness measures accuracy: it needs labelled images (an ImageNet-style folder or "
                        "a file,label CSV), not synthetic data")
    pe = setup.net.patch_embed
    n_patches = int(pe.num_patches)
    if tuple(pe.patch_size) != (16, 16):
        raise UserError(f"the masks are 16x16 squares of the paper; this model's patches are {tuple(pe.patch_size)}")
    if counts is None:
        assert fraction is not None
        counts = [mask_count_for(fraction, n_patches)]
    for c in counts:
        check_count(c, n_patches, placement)

    out = common.Outcome(csv_path=csv_path, setup=setup)
    done = common.rows_by_key(csv_path)
    with common.passes(s.progress) as bar:
        for spec in specs:
            keys = {c: common.row_key(setup, "robustness", spec, mask_count=c, placement=placement, fill=fill,
                                      seed=s.seed) for c in counts}
            pending = [c for c in counts if s.force or keys[c] not in done]
            with common.Patched(setup.net, spec) as info:
                label = common.short_label(spec)
                for c in counts:
                    if c not in pending:
                        out.rows.append(done[keys[c]])
                        out.resumed += 1
                        continue
                    res = masked_accuracy(setup, c, placement, fill, bar, f"{label} · {c} masks")
                    row = {
                        **common.row_fields(setup, info, keys[c]),
                        "mask_count": c,
                        "mask_fraction": round(c / n_patches, 4),
                        "placement": placement,
                        "fill": fill,
                        "top1": common.rounded(res.top1, 3),
                        "top5": common.rounded(res.top5, 3),
                        "correct1": res.correct1,
                        "correct5": res.correct5,
                    }
                    append_row(csv_path, row, ROBUSTNESS_COLUMNS)
                    out.rows.append(row)
                    out.measured += 1
    return out


def print_table(out: common.Outcome) -> None:
    """Paper Table 4's shape: one row per model/reducer, one column per mask count (top-1 %)."""
    assert out.setup is not None
    setup = out.setup
    counts = list(dict.fromkeys(int(r["mask_count"]) for r in out.rows))
    fractions = {int(r["mask_count"]): float(r["mask_fraction"]) for r in out.rows}
    r0 = out.rows[0]
    caption = (f"top-1 % on {len(setup.images)} images of {setup.source.path}; random 16x16 masks, placement "
               f"{r0['placement']}, fill {r0['fill']}, seed {r0['seed']} (same masked images for every row).\n"
               + common.training_free_note(setup))
    t = common.table(f"robustness: {setup.timm_name} (paper Table 4)",
                     ["reducer", "final tokens", *[f"{c} masks ({100 * fractions[c]:.0f}%)" for c in counts]],
                     caption)
    by_spec: dict[str, dict[int, Any]] = {}
    tokens: dict[str, Any] = {}
    for r in out.rows:
        by_spec.setdefault(r["reducer_spec"], {})[int(r["mask_count"])] = r["top1"]
        tokens[r["reducer_spec"]] = r["final_tokens"]
    for spec, cells in by_spec.items():
        name = f"{setup.timm_name} (no reduction)" if spec == common.BASELINE else common.short_label(spec)
        t.add_row(name, str(tokens[spec]),
                  *[f"{float(cells[c]):.2f}" if c in cells and cells[c] != "" else "-" for c in counts])
    common.console().print(t)
