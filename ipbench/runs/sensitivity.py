"""`ipbench sensitivity`: what each reducer does as the patch size or the resolution changes.

The ImagePiece review names the method's limitation, "sensitive to patch size and structure"; the
paper used 16×16 patches only. Here one model is rebuilt at each patch size (at its own resolution)
and at each resolution (at its own patch size) on the SAME weights, the patch and position embeddings
resampled by timm's own functions (FlexiViT's resize of the kernel, bicubic position grid), and each
variant is one sweep at one keep rate: every reducer against that variant's own baseline. A keep rate
is a share of the tokens, so it scales with the token count by itself; ToMe's r (and every knob that
is not a keep rate) is set, as in any sweep, to the value whose GMACs match EViT's at that keep rate on
that variant ([choice]: the count scales with the tokens, docs: README "ipbench sensitivity").

Each variant's rows are its own resumable sweep (OUT/sensitivity/<variant>/sweep.csv);
OUT/sensitivity.csv is rebuilt from them after every run.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ipbench import results
from ipbench.errors import UserError
from ipbench.reducers import Policy
from ipbench.runs.context import RunSpec
from ipbench.runs.progress import Progress, Silent
from ipbench.runs.sweep import SweepRequest, run_sweep
from ipbench.schemas import SENSITIVITY_COLUMNS

DEFAULT_KEEP = 0.7


@dataclass(frozen=True)
class Variant:
    """One model variant: which axis it varies, and its patch size and resolution."""

    axis: str  # "patch" or "resolution"
    patch: int
    img: int

    @property
    def name(self) -> str:
        return f"patch{self.patch}_img{self.img}"


@dataclass
class SensitivityRequest:
    policies: list[Policy]
    patch_sizes: list[int]
    img_sizes: list[int]
    keep: float = DEFAULT_KEEP
    sweep: SweepRequest = field(default_factory=lambda: SweepRequest(policies=[]))


def native_sizes(model: str) -> tuple[int, int]:
    """The model's own patch size and resolution (from a randomly initialised copy: no weights read)."""
    import timm

    from ipbench.models import resolve_name

    net = timm.create_model(resolve_name(model), pretrained=False)
    if not hasattr(net, "patch_embed"):
        raise UserError(f"{model} has no patch embedding: sensitivity varies a ViT's patch size and resolution")
    return int(net.patch_embed.patch_size[0]), int(net.patch_embed.img_size[0])


def variants(patch: int, img: int, patch_sizes: list[int], img_sizes: list[int]) -> list[Variant]:
    """Each patch size at the native resolution, then each resolution at the native patch size."""
    out = [Variant("patch", p, img) for p in patch_sizes]
    out += [Variant("resolution", patch, s) for s in img_sizes]
    for v in out:
        if v.img // v.patch < 2:
            raise UserError(f"patch size {v.patch} at {v.img} px leaves a {v.img // v.patch}x{v.img // v.patch} "
                            "grid; a reducer needs at least 2x2 patches")
    return out


def _row(v: Variant, r: dict[str, str]) -> dict[str, Any]:
    grid = v.img // v.patch
    return {"axis": v.axis, "patch_size": v.patch, "img_size": v.img, "grid": grid, "patch_tokens": grid * grid,
            **{c: r.get(c, "") for c in SENSITIVITY_COLUMNS if c in r},
            # the model at its own size lies on both curves: one row per axis
            "config_key": f"{v.axis}/{r.get('config_key', '')}"}


def run_sensitivity(spec: RunSpec, req: SensitivityRequest, out: Path,
                    progress: Progress | None = None) -> tuple[Path, list[dict[str, Any]], list[str]]:
    """Sweep every variant (resuming each) and rebuild OUT/sensitivity.csv; returns its path, rows, notes."""
    progress = progress or Silent()
    patch, img = native_sizes(spec.model)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    swept: dict[str, Any] = {}  # the model at its own size is one sweep, though on both axes
    for v in variants(patch, img, req.patch_sizes, req.img_sizes):
        vspec = replace(spec, patch_size=None if v.patch == patch else v.patch,
                        img_size=None if v.img == img else v.img)
        sreq = replace(req.sweep, policies=req.policies, keep_rates=[req.keep], budgets=None, knob_values=None)
        progress.log(f"variant: patch {v.patch}, {v.img} px ({v.img // v.patch}x{v.img // v.patch} patches)")
        if v.name not in swept:
            swept[v.name] = run_sweep(vspec, sreq, out / "sensitivity" / v.name, progress)
        report = swept[v.name]
        rows.extend(_row(v, r) for r in report.rows)
        notes.extend(n for n in report.notes if n not in notes)
    csv_path = out / "sensitivity.csv"
    results.write_table(csv_path, rows, SENSITIVITY_COLUMNS)
    return csv_path, rows, notes
