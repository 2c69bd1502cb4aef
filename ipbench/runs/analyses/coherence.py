"""`ipbench coherence`: ImagePiece's local-coherence ablation (paper Table 8), training-free.

The paper's local coherence is a learned convolutional stem; on off-the-shelf weights ipbench
offers the training-free stand-in, a locality penalty λ on the matching similarity (docs/METHODS.md).
For each ImagePiece spec: λ over a grid with locality off (λ=0) and on; the ``retok=prune``
control (the same schedule with the pairs dropped instead of merged); and ``stem=conv`` on a
second checkpoint trained with the stem, when one is given. Per variant: top-1, GMACs (fvcore and
analytic) and the mean cosine of the merged pairs (all blocks, and the first re-tokenize block,
which is the paper's Table 8 value).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from ipbench import models
from ipbench.errors import UserError
from ipbench.measure.accuracy import Result
from ipbench.reducers import Policy, set_tracing
from ipbench.reducers.imagepiece import checkpoint_has_conv_stem, has_conv_stem
from ipbench.reducers.trace import merged_pair_similarity
from ipbench.results import COHERENCE_COLUMNS, accuracy_fields, cell
from ipbench.runs.analyses import common
from ipbench.runs.analyses.similarity import Moments, merge_op
from ipbench.runs.context import RunSpec, fit_checkpoint
from ipbench.runs.cost import measured_gmacs
from ipbench.runs.loop import Forward, Job, Merged
from ipbench.runs.plan import config, variant
from ipbench.runs.progress import Progress

DEFAULT_REDUCERS = "imagepiece"
DEFAULT_LOCALITIES = "0,0.5,1,2"
VARIED = ("locality", "retok", "stem")  # the parameters of ImagePiece this ablation varies


def parse_localities(text: str) -> list[float]:
    """``0,0.5,1,2`` → λ values (>= 0)."""
    values = common.parse_floats(text, "--localities")
    bad = [v for v in values if v < 0]
    if bad:
        raise UserError(f"--localities: λ must be >= 0, got {bad[0]:g}")
    return values


def varied_part(policy: Policy) -> Policy:
    """The part of a spec whose locality, retok and stem the ablation varies (ImagePiece's)."""
    for part in policy.parts:
        if all(k in part.params for k in VARIED):
            return part
    raise UserError(f"coherence varies ImagePiece's locality; {policy.text!r} has no imagepiece part")


def applicable(bases: list[Policy]) -> tuple[list[Policy], list[str]]:
    """The specs the ablation applies to (an imagepiece part) and a note for each other one, the
    rule of every analysis: a reducer an analysis does not apply to is skipped with a note; none
    that applies is an error (before anything loads)."""
    kept, notes = [], []
    for b in bases:
        try:
            varied_part(b)
            kept.append(b)
        except UserError:
            notes.append(f"{b.label()}: has no imagepiece part, so there is no locality to vary: skipped")
    if not kept:
        raise UserError("coherence varies ImagePiece's locality: no imagepiece part in "
                        f"{', '.join(repr(b.text) for b in bases)}")
    return kept, notes


def with_params(policy: Policy, **params: Any) -> Policy:
    """`policy` with ImagePiece's parameters set (in a combination, on its part)."""
    part = varied_part(policy)
    if len(policy.parts) == 1:
        return policy.with_params(**params)
    return policy.with_params(**{part.name: params})


def variants(bases: list[Policy], localities: list[float], prune: bool, stem: bool) -> list[tuple[Policy, Policy]]:
    """(base, variant) in table order: the λ grid, the prune control, the conv stem."""
    out: dict[tuple[str, str], tuple[Policy, Policy]] = {}
    for base in bases:
        todo = [dict(locality=lam, retok="merge", stem="patch") for lam in localities]
        if prune:
            todo.append(dict(locality=0.0, retok="prune", stem="patch"))
        if stem:
            todo.append(dict(locality=0.0, retok="merge", stem="conv"))
        for params in todo:
            v = with_params(base, **params)
            out.setdefault((base.spec, v.spec), (base, v))
    return list(out.values())


def load_stem_model(spec: RunSpec, path: str, device: str) -> nn.Module:
    """A timm ViT whose patch embedding is ImagePiece's conv stem, with weights trained with it (at the
    spec's --img-size, like the main model); the file is read once, by the strict load."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--stem-checkpoint not found: {file}")
    net = models.create_model(spec.model, str(file), device=device, img_size=spec.img_size,
                              patch_size=spec.patch_size, adapt=fit_checkpoint)
    if not has_conv_stem(net):
        raise UserError(f"--stem-checkpoint {file} has no conv-stem weights (patch_embed.proj.body.*): it must be "
                        "trained with ImagePiece's local-coherence stem (ipbench finetune --stem conv)")
    return net


def check_main_checkpoint(checkpoint: str | None) -> None:
    """A conv-stem checkpoint given as --checkpoint would fail the strict load with a puzzling key list."""
    if checkpoint is None or not Path(checkpoint).is_file():
        return
    state = models._unwrap(models._read_state_dict(Path(checkpoint)), Path(checkpoint))
    if checkpoint_has_conv_stem(state):
        raise UserError(f"{checkpoint} has ImagePiece's conv stem; pass it as --stem-checkpoint and give the "
                        "plain weights as --checkpoint")


class _Measure(Merged):
    """Accuracy and merged-pair similarity of one variant over the traced pass."""

    merged = ("res", "sims", "first_sims")

    def __init__(self, op: str, first: int | None) -> None:
        self.op, self.first = op, first
        self.res = Result()
        self.sims = {"metric": Moments(), "x": Moments()}
        self.first_sims = {"metric": Moments(), "x": Moments()}

    def add(self, out: Forward) -> None:
        self.res.add(out.logits, out.labels)
        assert out.trace is not None
        for on in ("metric", "x"):
            for layer, v in merged_pair_similarity(out.trace, on, op=self.op).items():
                if v.numel():
                    self.sims[on].add(v)
                    if layer == self.first:
                        self.first_sims[on].add(v)


def run(spec: RunSpec, out: Path, bases: list[Policy], localities: list[float], prune: bool,
        stem_checkpoint: str | None, force: bool = False, progress: Progress | None = None) -> common.Outcome:
    csv_path, done = common.start(spec, out, "coherence", COHERENCE_COLUMNS, progress)
    todo = variants(bases, localities, prune, stem_checkpoint is not None)
    check_main_checkpoint(spec.checkpoint)
    run = common.load(spec, "coherence", progress, accuracy=True)
    done = common.resume_state(run.ctx, done)
    runs = {"patch": run}
    if stem_checkpoint is not None:
        ctx = dataclasses.replace(
            run.ctx, net=load_stem_model(spec, stem_checkpoint, run.ctx.device), weights="checkpoint",
            checkpoint=str(Path(stem_checkpoint).resolve()), sha256=models.checkpoint_sha256(stem_checkpoint),
            trained_with=models.trained_with(stem_checkpoint))
        runs["conv"] = dataclasses.replace(run, ctx=ctx)
    outcome = common.Outcome(csv_path=csv_path, run=run)
    warnings: list[str] = []
    for _, policy in todo:
        p = varied_part(policy).params
        su = runs[p["stem"]]
        key = su.key("coherence", policy.spec)
        if not force and key in done:
            outcome.rows.append(done[key])
            outcome.resumed += 1
            continue
        cfg = config(su.net, policy)
        model = variant(su.net, policy, tracing=True)
        probe = su.probe(model)
        op = merge_op(probe) or ("merge" if p["retok"] == "merge" else "prune")
        layers = sorted({e["layer"] for e in probe if e["op"] == op})
        m = _Measure(op, layers[0] if layers else None)
        label = policy.label()
        su.run([Job(policy.spec, model, [m], traced=True)], f"coherence: {label}")
        set_tracing(model, False)
        gmacs, counter = (measured_gmacs(model, su.ctx.inputs(su.first_image), label, cfg.gmacs, warnings.append)
                          if su.ctx.world.main else ("", ""))
        row = {
            **su.row_fields(cfg, key),
            "locality": p["locality"], "retok": p["retok"], "stem": p["stem"],
            **accuracy_fields(m.res.correct1, m.res.correct5, m.res.total),
            "gmacs": cell(gmacs if gmacs != "" else None, 4),
            "gmacs_analytic": cell(cfg.gmacs, 4), "flop_counter": counter,
            "sim_metric": cell(m.sims["metric"].mean, 5),
            "sim_hidden": cell(m.sims["x"].mean, 5),
            "sim_metric_first": cell(m.first_sims["metric"].mean, 5),
            "sim_hidden_first": cell(m.first_sims["x"].mean, 5),
            "n_pairs": m.sims["metric"].n,
        }
        run.write(csv_path, row, COHERENCE_COLUMNS)
        outcome.rows.append(row)
        outcome.measured += 1
    outcome.notes.extend(dict.fromkeys(w.removeprefix("warning: ") for w in warnings))
    if stem_checkpoint is None:
        outcome.notes.append("stem=conv not measured: it needs weights trained with ImagePiece's conv stem "
                             "(--stem-checkpoint FILE); the timm weights have the plain patch embedding")
    return outcome
