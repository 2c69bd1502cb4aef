"""Per-image records: one gzip'd CSV per row under OUT/predictions/, the row's counts recomputable
from it, exactly one per configuration after a resume, the same under torchrun (tests/test_distributed)."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from ipbench.cli import app
from ipbench.results import ACCURACY_INTERVAL_COLUMNS, PREDICTION_COLUMNS, accuracy_fields, predictions_path

runner = CliRunner()
ENV = {"IPBENCH_CHECKPOINT": None, "IPBENCH_DATA": None}


def rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


def test_every_sweep_row_has_its_records_and_a_resume_adds_only_the_new_ones(tmp_path: Path, checkpoint_path: Path,
                                                                           data_path: Path) -> None:
    base = ["sweep", "--checkpoint", str(checkpoint_path), "--data", str(data_path), "--limit", "40", "--no-speed",
            "--out", str(tmp_path)]
    assert runner.invoke(app, [*base, "--reducers", "tome", "--keep-rates", "0.7"], env=ENV).exit_code == 0
    result = runner.invoke(app, [*base, "--reducers", "tome,evit", "--keep-rates", "0.7"], env=ENV)
    assert result.exit_code == 0, result.output
    written = rows(tmp_path / "sweep.csv")
    assert [r["reducer"] for r in written] == ["none", "tome", "evit"]  # the resume measured evit only
    # under the table, this sweep's paired comparisons: each reducer against none, and tome against evit
    # (the same keep rate); every row with its sample size and interval, from its counts
    assert "which differences are real (3 pairs;" in result.output
    for row in written:
        want = accuracy_fields(int(row["correct1"]), int(row["correct5"]), 40)
        assert {k: row[k] for k in ACCURACY_INTERVAL_COLUMNS} == {k: str(want[k]) for k in ACCURACY_INTERVAL_COLUMNS}
        shown = f"{float(row['top1']):.1f} [{float(row['top1_low']):.1f}, {float(row['top1_high']):.1f}]"
        assert shown in result.output
    files = sorted((tmp_path / "predictions").iterdir())
    assert [f.name for f in files] == sorted(f"{r['config_key']}.csv.gz" for r in written)
    for row in written:
        frame = pd.read_csv(predictions_path(tmp_path, row["config_key"]))
        assert list(frame.columns) == PREDICTION_COLUMNS and list(frame["image"]) == list(range(40))
        assert int(frame["correct1"].sum()) == int(row["correct1"])
        assert int(frame["correct5"].sum()) == int(row["correct5"])
        assert (frame["correct1"] == (frame["pred1"] == frame["label"])).all()
    base_frame = pd.read_csv(predictions_path(tmp_path, written[0]["config_key"]))
    tome_frame = pd.read_csv(predictions_path(tmp_path, written[1]["config_key"]))
    assert (base_frame["label"] == tome_frame["label"]).all()  # the same images, in the same order


def test_eval_and_robustness_write_their_records(tmp_path: Path, checkpoint_path: Path, data_path: Path) -> None:
    common = ["--checkpoint", str(checkpoint_path), "--data", str(data_path), "--limit", "16", "--out", str(tmp_path)]
    assert runner.invoke(app, ["eval", "--reducer", "evit", *common], env=ENV).exit_code == 0
    robust = runner.invoke(app, ["robustness", "--reducers", "tome", "--masks", "30", *common], env=ENV)
    assert robust.exit_code == 0, robust.output
    for row in rows(tmp_path / "robustness.csv"):  # each cell of the printed table with its interval
        shown = f"{float(row['top1']):.2f} [{float(row['top1_low']):.2f}, {float(row['top1_high']):.2f}]"
        assert shown in robust.output
    for name in ("eval", "robustness"):
        for row in rows(tmp_path / f"{name}.csv"):
            frame = pd.read_csv(predictions_path(tmp_path, row["config_key"]))
            assert len(frame) == 16 and int(frame["correct1"].sum()) == int(row["correct1"]), name
