"""ipbench plot / report: figures and REPORT.md from result folders, skipping what is missing."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ipbench.cli import app
from ipbench.results import SWEEP_COLUMNS, append_row

runner = CliRunner()

COMMON = {"model": "deit_tiny_patch16_224", "data": "/x/nips17-dev", "num_images": 1000,
          "timestamp": "2026-01-01T00:00:00+00:00", "checkpoint_sha256": "0123456789abcdef", "device": "cpu"}
DEIT_T_BASE = "197 " * 11 + "197"

# (spec, keep, tokens after each block, GMACs, top-1, img/s): values like those METHODS.md reports
SWEEP = [
    ("none", "", DEIT_T_BASE, 1.258, 86.7, 650.0),
    ("evit:keep=0.7,fuse=true,layers=3,6,9,fused_size=one", 0.7,
     "197 197 197 140 140 140 100 100 100 72 72 72", 0.821, 79.9, 960.0),
    ("evit:keep=0.5,fuse=true,layers=3,6,9,fused_size=one", 0.5,
     "197 197 197 100 100 100 51 51 51 27 27 27", 0.62, 67.7, 1250.0),
    ("imagepiece:keep=0.7,k=auto,r=k/4", 0.7, "197 183 170 121 112 104 75 70 65 47 47 47", 0.675, 79.2, 1080.0),
    ("imagepiece:keep=0.5,k=auto,r=k/4", 0.5, "197 173 152 78 69 61 32 28 25 14 14 14", 0.492, 64.6, 1400.0),
    ("tome:r=13,prop_attn=true", 0.7, "184 171 158 145 132 119 106 93 80 67 54 41", 0.731, 83.0, 1050.0),
]
# The short labels a run writes beside each spec (reducer_label, reducer_line): what the plots show.
LABELS = {"none": ("none", "none"), "tome:r=13,prop_attn=true": ("tome:r=13", "tome"),
          "evit:keep=0.7,fuse=true,layers=3,6,9,fused_size=one": ("evit:keep=0.7", "evit"),
          "evit:keep=0.5,fuse=true,layers=3,6,9,fused_size=one": ("evit:keep=0.5", "evit"),
          "imagepiece:keep=0.7,k=auto,r=k/4": ("imagepiece:keep=0.7", "imagepiece"),
          "imagepiece:keep=0.5,k=auto,r=k/4": ("imagepiece:keep=0.5", "imagepiece"),
          "imagepiece:keep=0.7": ("imagepiece:keep=0.7", "imagepiece")}


def labels(spec: str) -> dict[str, str]:
    label, line = LABELS.get(spec, (spec, spec.split(":")[0]))
    return {"reducer_label": label, "reducer_line": line}


def write_sweep(folder: Path, name: str = "sweep.csv") -> Path:
    path = folder / name
    base_img_s = SWEEP[0][5]
    for i, (spec, keep, tokens, gmacs, top1, img_s) in enumerate(SWEEP):
        append_row(path, {
            **COMMON, "config_key": f"k{i}", "reducer": spec.split(":")[0], "reducer_spec": spec, **labels(spec),
            "keep_rate": keep, "tokens_per_layer": tokens, "final_tokens": tokens.split()[-1],
            "training_free": True, "gmacs": gmacs, "gmacs_ratio": round(SWEEP[0][3] / gmacs, 3),
            "top1": top1, "top5": min(99.0, top1 + 10), "img_s_median": img_s, "img_s_min": img_s * 0.97,
            "img_s_max": img_s * 1.02, "speedup_median": round(img_s / base_img_s, 3),
            "speedup_min": round(img_s / base_img_s * 0.98, 3), "speedup_max": round(img_s / base_img_s * 1.01, 3),
            "batch_size": 32, "threads": 2, "device_name": "Test CPU", "torch": "2.14.1", "timm": "1.0.31",
        }, SWEEP_COLUMNS)
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


SPECS = {"none": "none", "evit": "evit:keep=0.7,fuse=true,layers=3,6,9,fused_size=one",
         "tome": "tome:r=13,prop_attn=true", "imagepiece": "imagepiece:keep=0.7"}


def write_analyses(folder: Path) -> None:
    """Hand-written analysis CSVs with realistic values (the columns the analyses commands write)."""
    table4 = {"none": [79.05, 78.65, 77.78, 76.52, 75.29, 68.28], "evit": [78.21, 77.72, 76.77, 75.42, 74.47, 68.10],
              "tome": [78.41, 77.73, 76.49, 74.99, 73.68, 65.41],
              "imagepiece": [79.63, 79.13, 78.36, 77.20, 76.63, 71.42]}
    rows = [{**COMMON, "reducer": k, "reducer_spec": SPECS[k], **labels(SPECS[k]), "mask_count": n,
             "mask_fraction": round(n / 196, 4), "placement": "patch", "fill": "zero", "top1": v, "top5": v + 12}
            for k, vals in table4.items() for n, v in zip((7, 10, 15, 20, 25, 50), vals)]
    write_csv(folder / "robustness.csv", rows)
    rows = [{**COMMON, "reducer": k, "reducer_spec": SPECS[k], **labels(SPECS[k]), "layer": layer, "features": feat,
             "pairs": "merged",
             "mean_cos": round((0.79 if k == "tome" else 0.81) - (0.01 * layer if k == "tome" else 0.0)
                               - (0.2 if feat == "hidden" else 0), 4), "n_pairs": 13 * 64}
            for k in ("tome", "imagepiece") for layer in ((range(12)) if k == "tome" else (1, 2, 4, 5, 7, 8))
            for feat in ("metric", "hidden")]
    write_csv(folder / "similarity.csv", rows)
    # top_p as a fraction, plus the pooled rows (layer "all") the analyses write
    rows = [{**COMMON, "reducer": "tome", "reducer_spec": SPECS["tome"], **labels(SPECS["tome"]), "layer": layer,
             "top_p": p, "tokens": "src",
             "share": round(s * (1 - 0.02 * (0 if layer == "all" else layer)), 4), "random_share": p,
             "n_merged": 13 * 64}
            for layer in [*range(12), "all"] for p, s in ((0.3, 0.6516), (0.2, 0.5283), (0.15, 0.4329), (0.7, 0.918))]
    write_csv(folder / "importance.csv", rows)
    rows = [{**COMMON, "reducer": "imagepiece", "reducer_spec": SPECS["imagepiece"], **labels(SPECS["imagepiece"]),
             "layer": layer,
             "attentive_rate": 0.7, "population": pop, "share_became_attentive": v * (1 if pop == "merged" else 0.8),
             "n_inattentive": 500}
            for pop in ("merged", "inattentive")
            for layer, v in zip((1, 2, 4, 5, 7, 8, "all"), (0.2799, 0.4439, 0.3549, 0.5877, 0.2897, 0.4327, 0.4))]
    write_csv(folder / "attentiveness.csv", rows)
    rows = [{**COMMON, "reducer": "imagepiece", "reducer_spec": f"imagepiece:keep=0.7,locality={lam}",
             "locality": lam, "retok": retok, "stem": "patch", "top1": top1 - lam * 0.5,
             "gmacs": 0.675, "sim_metric": 0.53 + 0.05 * lam, "sim_hidden": 0.4 + 0.03 * lam}
            for lam in (0, 0.5, 1, 2) for retok, top1 in (("merge", 79.2), ("prune", 75.6))]
    write_csv(folder / "coherence.csv", rows)


EXPECTED = {
    "sweep_top1_vs_throughput", "sweep_top1_vs_gmacs", "sweep_speedup_vs_gmacs_ratio", "sweep_tokens_per_layer",
    "robustness_top1_vs_masks", "similarity_per_layer", "importance_share", "attentiveness_per_layer",
    "coherence_locality",
}


@pytest.fixture
def results(tmp_path: Path) -> Path:
    folder = tmp_path / "results"
    folder.mkdir()
    write_sweep(folder)
    write_analyses(folder)
    return folder


def _png_ok(path: Path) -> bool:
    return path.stat().st_size > 5000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_writes_every_figure_and_the_report(results: Path) -> None:
    out = runner.invoke(app, ["plot", str(results)])
    assert out.exit_code == 0, out.output
    plots = results / "plots"
    assert {p.stem for p in plots.glob("*.png")} == EXPECTED
    assert {p.stem for p in plots.glob("*.svg")} == EXPECTED
    assert all(_png_ok(p) for p in plots.glob("*.png"))
    report = (results / "REPORT.md").read_text()
    for name in ("sweep.csv", "robustness.csv", "similarity.csv", "importance.csv", "attentiveness.csv",
                 "coherence.csv"):
        assert f"## {name}" in report
    assert "![" in report and "plots/sweep_top1_vs_gmacs.png" in report
    assert "deit_tiny_patch16_224" in report and "0123456789abcdef" in report
    # the markdown tables: short reducer labels, the baseline, pivoted analyses
    assert "| evit:keep=0.7 " in report and "| tome:r=13 " in report
    assert "86.7" in report and "79.63" in report
    assert "| tome:r=13 |      30 |   65.16 " in report  # top_p fraction shown in %, share in %
    assert "all blocks" in report and "population" in report  # pooled rows; qualifier with 2 values


def test_plot_skips_missing_and_broken_csvs_with_a_note(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "similarity.csv").write_text("")  # empty file
    write_csv(folder / "robustness.csv", [{"reducer_spec": "none", "top1": 80.0}])  # no mask column
    write_csv(folder / "notes.csv", [{"a": 1}])  # not ours
    (folder / "importance.csv").write_text("reducer_spec,layer,top_p,share\n")  # header only
    write_sweep(folder, "flops.csv")
    out = runner.invoke(app, ["plot", str(folder), "--format", "png"])
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    assert "similarity.csv: empty file" in text
    assert "notes.csv: not an ipbench result CSV" in text
    assert "importance.csv: no rows yet" in text
    assert "robustness.csv: no 'top1 vs masks' figure" in text
    assert (folder / "plots" / "flops_top1_vs_gmacs.png").exists()
    assert "## flops.csv" in (folder / "REPORT.md").read_text()


def test_plot_on_an_empty_or_missing_folder(tmp_path: Path) -> None:
    out = runner.invoke(app, ["plot", str(tmp_path)])
    assert out.exit_code == 3 and "nothing plotted: no ipbench result CSV with rows" in " ".join(out.stderr.split())
    assert not (tmp_path / "REPORT.md").exists()
    (tmp_path / "eval.csv").write_text("config_key,model\n")  # a CSV, but no row to draw
    assert runner.invoke(app, ["plot", str(tmp_path)]).exit_code == 3
    out = runner.invoke(app, ["plot", str(tmp_path / "nope")])
    assert out.exit_code == 2 and "error:" in out.stderr and "nope" in out.stderr


def test_runs_of_different_models_get_their_own_figures(tmp_path: Path) -> None:
    from ipbench.plots import plot_folder

    write_sweep(tmp_path)
    rows = (tmp_path / "sweep.csv").read_text().splitlines()
    extra = [r.replace("deit_tiny_patch16_224", "deit_small_patch16_224").replace(",k", ",s", 1) for r in rows[1:]]
    (tmp_path / "sweep.csv").write_text("\n".join(rows + extra) + "\n")
    res = plot_folder(tmp_path, formats=("png",))
    names = sorted(p.name for p in res.figures["sweep.csv"])
    assert any("deit_small" in n for n in names) and any("deit_tiny" in n for n in names)


def test_short_spec_keeps_only_what_differs_from_defaults() -> None:
    from ipbench.reducers import short_label

    def short_spec(spec: str, drop_swept: bool = False) -> str:  # the one short-label function
        return short_label(spec, drop_knob=drop_swept)

    assert short_spec("evit:keep=0.7,fuse=true,layers=3,6,9,fused_size=one") == "evit:keep=0.7"
    assert short_spec("evit:keep=0.7,fuse=true,layers=3,6,9,fused_size=one", drop_swept=True) == "evit"
    assert short_spec("evit:keep=0.5,fuse=false,layers=3,6,9,fused_size=one") == "evit:keep=0.5,fuse=false"
    assert short_spec("evit:keep=0.5,fuse=false,layers=3,6,9,fused_size=one", drop_swept=True) == "evit:fuse=false"
    assert short_spec("tome:r=8,prop_attn=true", drop_swept=True) == "tome"
    assert short_spec("imagepiece:keep=0.6,r=k/2", drop_swept=True) == "imagepiece:r=k/2"
    assert short_spec("none") == "none"
    assert short_spec("mystery:a=1") == "mystery:a=1"


def test_plot_on_a_real_eval_run(tmp_path: Path, small_folder: Path, checkpoint_path: Path, clean_env) -> None:
    """Real `ipbench eval` rows (6 shared images) plot and report."""
    out = tmp_path / "res"
    for reducer in ("none", "tome:r=13", "evit:keep=0.7"):
        r = runner.invoke(app, ["eval", "--checkpoint", str(checkpoint_path), "--data", str(small_folder),
                                "--reducer", reducer, "--workers", "0", "--out", str(out)], env=clean_env)
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["plot", str(out), "--format", "png"])
    assert r.exit_code == 0, r.output
    assert _png_ok(out / "plots" / "eval_top1.png") and _png_ok(out / "plots" / "eval_tokens_per_layer.png")
    report = (out / "REPORT.md").read_text()
    assert "## eval.csv" in report and "| tome:r=13 " in report and "images: `" in report


def test_report_command_writes_only_the_report(results: Path) -> None:
    out = runner.invoke(app, ["report", str(results)])
    assert out.exit_code == 0, out.output
    assert (results / "REPORT.md").exists() and not (results / "plots").exists()
    assert "ipbench plot" in (results / "REPORT.md").read_text()  # says how to get the figures


def test_plot_formats_are_checked(results: Path) -> None:
    bad = runner.invoke(app, ["plot", str(results), "--format", "png,gif"])
    assert bad.exit_code == 2 and "valid formats are png, svg, pdf" in bad.stderr
    assert not (results / "plots").exists()


def test_a_forced_rerun_shows_its_newest_row(tmp_path: Path) -> None:
    """--force appends a second row of the same config_key: tables and figures take the newest."""
    from ipbench.results import latest, read_rows

    path = write_sweep(tmp_path)
    rows = path.read_text().splitlines()
    newer = rows[2].replace(",79.9,", ",12.5,")  # evit:keep=0.7 measured again
    assert newer != rows[2]
    path.write_text("\n".join([*rows, newer]) + "\n")
    frame = latest(read_rows(path))
    assert len(frame) == len(SWEEP) and list(frame["top1"])[-1] == 12.5
    report = runner.invoke(app, ["report", str(tmp_path)])
    assert report.exit_code == 0, report.output
    text = (tmp_path / "REPORT.md").read_text()
    assert "12.50" in text and "79.90" not in text
