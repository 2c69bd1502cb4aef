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

from torch import Tensor, nn

from ipbench import models
from ipbench.analyses import common
from ipbench.analyses.robustness import add_hits
from ipbench.analyses.similarity import Moments, merge_op
from ipbench.errors import UserError
from ipbench.measure.accuracy import Result
from ipbench.measure.flops import COUNTER_NAME, analytic_gmacs, count_gmacs
from ipbench.reducers import parse_spec, set_tracing, token_plan
from ipbench.reducers.imagepiece import checkpoint_has_conv_stem, load_conv_stem_checkpoint
from ipbench.reducers.trace import Trace, merged_pair_similarity
from ipbench.results import COHERENCE_COLUMNS, append_row, check_header

DEFAULT_REDUCERS = "imagepiece"
DEFAULT_LOCALITIES = "0,0.5,1,2"


def parse_localities(text: str) -> list[float]:
    """``0,0.5,1,2`` → λ values (>= 0)."""
    values = common.parse_floats(text, "--localities")
    bad = [v for v in values if v < 0]
    if bad:
        raise UserError(f"--localities: λ must be >= 0, got {bad[0]:g}")
    return values


def with_params(spec: str, **params: Any) -> str:
    """The canonical spec with ImagePiece's parameters set (in a combination, on its part)."""
    pieces = spec.split("+")
    names = [p.partition(":")[0].strip().lower() for p in pieces]
    if "imagepiece" not in names:
        raise UserError(f"coherence varies ImagePiece's locality; {spec!r} has no imagepiece part")
    i = names.index("imagepiece")
    extra = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    piece = pieces[i].strip()
    pieces[i] = piece + ("," if ":" in piece and not piece.endswith(":") else "" if ":" in piece else ":") + extra
    return parse_spec("+".join(pieces)).spec


def imagepiece_params(spec: str) -> dict[str, Any]:
    """The parameters of the ImagePiece part of a spec."""
    for part in common.parts(parse_spec(spec)):
        if part.name == "imagepiece":
            return dict(part.params)
    raise UserError(f"{spec!r} has no imagepiece part")


def variants(bases: list[str], localities: list[float], prune: bool, stem: bool) -> list[tuple[str, str]]:
    """(base spec, variant spec) in table order: the λ grid, the prune control, the conv stem."""
    out: list[tuple[str, str]] = []
    for base in bases:
        out += [(base, with_params(base, locality=lam, retok="merge", stem="patch")) for lam in localities]
        if prune:
            out.append((base, with_params(base, locality=0.0, retok="prune", stem="patch")))
        if stem:
            out.append((base, with_params(base, locality=0.0, retok="merge", stem="conv")))
    return list(dict.fromkeys(out))


def load_stem_model(model: str, path: str, device: str) -> nn.Module:
    """A timm ViT whose patch embedding is ImagePiece's conv stem, with weights trained with it."""
    import timm

    file = Path(path)
    if not file.is_file():
        raise UserError(f"--stem-checkpoint not found: {file}")
    state = models._unwrap(models._read_state_dict(file), file)
    if not checkpoint_has_conv_stem(state):
        raise UserError(f"--stem-checkpoint {file} has no conv-stem weights (patch_embed.proj.body.*): it must be "
                        "trained with ImagePiece's local-coherence stem")
    net = timm.create_model(models.resolve_name(model), pretrained=False)
    load_conv_stem_checkpoint(net, state)
    return net.to(device).eval()


def _check_main_checkpoint(checkpoint: str | None) -> None:
    """A conv-stem checkpoint given as --checkpoint would fail the strict load with a puzzling key list."""
    if checkpoint is None or not Path(checkpoint).is_file():
        return
    state = models._unwrap(models._read_state_dict(Path(checkpoint)), Path(checkpoint))
    if checkpoint_has_conv_stem(state):
        raise UserError(f"{checkpoint} has ImagePiece's conv stem; pass it as --stem-checkpoint and give the "
                        "plain weights as --checkpoint")


class _Measure:
    """Accuracy and merged-pair similarity of one variant over the traced pass."""

    def __init__(self, op: str, first: int | None) -> None:
        self.op, self.first = op, first
        self.res = Result()
        self.sims = {"metric": Moments(), "x": Moments()}
        self.first_sims = {"metric": Moments(), "x": Moments()}

    def add(self, trace: Trace, logits: Tensor, labels: Tensor) -> None:
        add_hits(self.res, logits, labels)
        for on in ("metric", "x"):
            for layer, v in merged_pair_similarity(trace, on, op=self.op).items():
                if v.numel():
                    self.sims[on].add(v)
                    if layer == self.first:
                        self.first_sims[on].add(v)


class _Gmacs:
    """GMACs per image: fvcore's count where torch.jit can trace the model, else the analytic one.

    A reducer torch.jit cannot trace fails the same way for every variant: after the first
    failure the analytic count is used at once, and one note says so.
    """

    def __init__(self) -> None:
        self.failed: list[str] = []
        self.reason = ""

    def __call__(self, net: nn.Module, x: Tensor, label: str) -> tuple[Any, str, Any]:
        """(GMACs, counter, analytic GMACs); the analytic count is empty for the conv stem."""
        try:
            analytic: Any = round(analytic_gmacs(net, token_plan(net)), 4)
        except ValueError:  # the conv stem: the analytic count knows the plain patch embedding only
            analytic = ""
        if not self.failed:
            try:
                return round(count_gmacs(net, x).gmacs, 4), COUNTER_NAME, analytic
            except RuntimeError as exc:
                self.reason = str(exc).split("traceable): ", 1)[-1].strip().splitlines()[0][:100]
        self.failed.append(label)
        return analytic, "analytic", analytic

    def note(self) -> str | None:
        if not self.failed:
            return None
        return (f"fvcore could not trace ImagePiece ({self.reason}); GMACs of {len(self.failed)} variant(s) are "
                "the analytic count (flop_counter=analytic)")


def run(s: common.Settings, localities: list[float], prune: bool, stem_checkpoint: str | None) -> common.Outcome:
    csv_path = s.out / "coherence.csv"
    check_header(csv_path, COHERENCE_COLUMNS)
    bases = common.reducer_specs(s.reducers, DEFAULT_REDUCERS)
    todo = variants(bases, localities, prune, stem_checkpoint is not None)
    _check_main_checkpoint(s.checkpoint)
    setup = common.load(s, "coherence")
    setups = {"patch": setup}
    if stem_checkpoint is not None:
        setups["conv"] = dataclasses.replace(
            setup, net=load_stem_model(s.model, stem_checkpoint, s.device),
            checkpoint=str(Path(stem_checkpoint).resolve()), sha256=models.checkpoint_sha256(stem_checkpoint))
    out = common.Outcome(csv_path=csv_path, setup=setup)
    done = common.rows_by_key(csv_path)
    x1 = next(setup.batches())[1][:1]
    count = _Gmacs()
    with common.passes(s.progress) as bar:
        for _, spec in todo:
            p = imagepiece_params(spec)
            su = setups[p["stem"]]
            key = common.row_key(su, "coherence", spec)
            if not s.force and key in done:
                out.rows.append(done[key])
                out.resumed += 1
                continue
            with common.Patched(su.net, spec, tracing=True) as info:
                probe = common.probe_trace(su)
                op = merge_op(probe) or ("merge" if p["retok"] == "merge" else "prune")
                layers = sorted({e["layer"] for e in probe if e["op"] == op})
                m = _Measure(op, layers[0] if layers else None)
                label = common.short_label(spec)
                common.traced_pass(su, bar, f"coherence: {label}", m.add)
                set_tracing(su.net, False)
                gmacs, counter, analytic = count(su.net, x1, label)
            row = {
                **common.row_fields(su, info, key),
                "locality": p["locality"], "retok": p["retok"], "stem": p["stem"],
                "top1": common.rounded(m.res.top1, 3), "top5": common.rounded(m.res.top5, 3),
                "correct1": m.res.correct1 if m.res.total else "", "correct5": m.res.correct5 if m.res.total else "",
                "gmacs": gmacs, "gmacs_analytic": analytic, "flop_counter": counter,
                "sim_metric": common.rounded(m.sims["metric"].mean, 5),
                "sim_hidden": common.rounded(m.sims["x"].mean, 5),
                "sim_metric_first": common.rounded(m.first_sims["metric"].mean, 5),
                "sim_hidden_first": common.rounded(m.first_sims["x"].mean, 5),
                "n_pairs": m.sims["metric"].n,
            }
            append_row(csv_path, row, COHERENCE_COLUMNS)
            out.rows.append(row)
            out.measured += 1
    if count.note():
        out.notes.append(str(count.note()))
    if stem_checkpoint is None:
        out.notes.append("stem=conv not measured: it needs weights trained with ImagePiece's conv stem "
                         "(--stem-checkpoint FILE); the timm weights have the plain patch embedding")
    return out


def print_table(out: common.Outcome) -> None:
    """Paper Table 8's shape: tokenizer / locality → merged-pair similarity and accuracy."""
    assert out.setup is not None
    t = common.table(
        f"coherence: ImagePiece local-coherence ablation, {out.setup.timm_name} (paper Table 8)",
        ["imagepiece", "locality λ", "retok", "stem", "top-1 %", "GMACs", "sim metric (first block)",
         "sim metric (all)", "sim hidden (all)"],
        "sim: mean cosine of the merged pairs (retok=prune: of the pairs that were dropped instead) on the matching "
        f"metric and on hidden states. {len(out.setup.images)} images of {out.setup.source.path}.\n"
        + common.training_free_note(out.setup))

    def num(r: dict[str, Any], col: str, fmt: str) -> str:
        return "-" if r.get(col, "") == "" else format(float(r[col]), fmt)

    for r in out.rows:
        base = common.short_label(with_params(r["reducer_spec"], locality=0.0, retok="merge", stem="patch"))
        t.add_row(base, f"{float(r['locality']):g}", str(r["retok"]), str(r["stem"]), num(r, "top1", ".2f"),
                  num(r, "gmacs", ".4f"), num(r, "sim_metric_first", ".4f"), num(r, "sim_metric", ".4f"),
                  num(r, "sim_hidden", ".4f"))
    common.console().print(t)
