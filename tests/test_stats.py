"""The statistics, checked against what they promise: coverage by simulation, McNemar by hand,
and `ipbench compare` on real per-image records."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ipbench import stats
from ipbench.cli import app

runner = CliRunner()


def test_wilson_interval_covers_the_true_rate_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(0)
    n, rate = 1000, 0.85
    hits = rng.binomial(n, rate, size=2000)
    covered = sum(lo <= 100 * rate <= hi for lo, hi in (stats.interval(int(k), n) for k in hits))
    assert 0.93 <= covered / 2000 <= 0.97
    lo, hi = stats.interval(850, 1000)
    assert 82.5 < lo < 83.0 and 87.0 < hi < 87.2  # about +-2.2 points, as the issue says


def test_mcnemar_exact_equals_the_hand_computation() -> None:
    # 1 image only a gets right, 6 only b: p = 2 * P(X <= 1), X ~ Binomial(7, 1/2) = 2 * (1 + 7) / 128
    assert stats.mcnemar_exact(1, 6) == pytest.approx(2 * (1 + 7) / 128)
    assert stats.mcnemar_exact(6, 1) == stats.mcnemar_exact(1, 6)
    assert stats.mcnemar_exact(3, 3) == 1.0 and stats.mcnemar_exact(0, 0) == 1.0
    # 0 vs 10: 2 / 2**10
    assert stats.mcnemar_exact(0, 10) == pytest.approx(2 / 1024)


def test_compare_counts_discordant_images_and_the_bootstrap_brackets_the_difference() -> None:
    a = np.array([1, 1, 0, 0, 1, 1, 1, 0] * 50, dtype=bool)
    b = np.array([1, 0, 1, 1, 1, 1, 1, 0] * 50, dtype=bool)
    r = stats.compare(a, b)
    assert (r.n, r.a_only, r.b_only) == (400, 50, 100)
    assert r.diff == pytest.approx(12.5) and r.diff_low < 12.5 < r.diff_high
    assert r.p_value == pytest.approx(stats.mcnemar_exact(50, 100)) and r.significant
    z = 1.959963984540054 + 0.8416212335729143
    assert r.min_detectable == pytest.approx(100 * z * math.sqrt(150 / 400) / math.sqrt(400))


def test_ipbench_compare_on_real_records(tmp_path: Path, checkpoint_path: Path, data_path: Path) -> None:
    result = runner.invoke(app, ["sweep", "--checkpoint", str(checkpoint_path), "--data", str(data_path), "--limit",
                                 "50", "--no-speed", "--reducers", "tome,evit", "--keep-rates", "0.7", "--out",
                                 str(tmp_path)], env={"IPBENCH_CHECKPOINT": None, "IPBENCH_DATA": None})
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["compare", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "compare.csv").open()))
    assert [(r["a"], r["b"]) for r in rows] == [("none", "tome:r=11"), ("none", "evit:keep=0.7"),
                                               ("tome:r=11", "evit:keep=0.7")]
    sweep = {r["reducer_label"]: r for r in csv.DictReader((tmp_path / "sweep.csv").open())}
    for r in rows:  # the pair's top-1 are the rows' own counts; the discordant images explain the difference
        assert float(r["top1_a"]) == pytest.approx(100 * int(sweep[r["a"]]["correct1"]) / 50)
        assert float(r["top1_b"]) == pytest.approx(100 * int(sweep[r["b"]]["correct1"]) / 50)
        assert int(sweep[r["b"]]["correct1"]) - int(sweep[r["a"]]["correct1"]) == int(r["b_only"]) - int(r["a_only"])
    assert "resolvable with these images" in result.output
    one = runner.invoke(app, ["compare", str(tmp_path), "--a", "tome:r=11", "--b", "evit:keep=0.7"])
    assert one.exit_code == 0 and len(list(csv.DictReader((tmp_path / "compare.csv").open()))) == 1
    report = runner.invoke(app, ["report", str(tmp_path)])
    assert report.exit_code == 0, report.output
    text = (tmp_path / "REPORT.md").read_text()
    section = text.split("### Which differences are real", 1)[1].split("\n\n", 2)[1]
    assert [line.split("|")[1].strip() for line in section.splitlines()[2:]] == ["none", "none", "tome:r=11"]
    assert all("| p=" in line for line in section.splitlines()[2:])
    assert "compare.csv" not in text  # compare.csv is no result table
    bad = runner.invoke(app, ["compare", str(tmp_path), "--a", "tome:r=11"])
    assert bad.exit_code == 2 and "--a and --b go together" in bad.stderr


def test_the_default_pairs_are_what_a_reader_of_a_sweep_asks() -> None:
    from ipbench.plots.compare import _default_pairs

    def row(key: str, reducer: str, line: str, keep: object, gmacs: float) -> dict[str, object]:
        return {"config_key": key, "reducer": reducer, "reducer_line": line, "keep_rate": keep, "gmacs": gmacs}

    rows = [row("b", "none", "none", "", 1.258), row("t8", "tome", "tome", "", 0.932),
            row("t11", "tome", "tome", "", 0.814), row("e7", "evit", "evit", 0.7, 0.824),
            row("i8", "imagepiece", "imagepiece", 0.8, 0.811), row("i7", "imagepiece", "imagepiece", 0.7, 0.70)]
    pairs = [(x["config_key"], y["config_key"]) for x, y in _default_pairs(rows)]
    assert pairs[:5] == [("b", "t8"), ("b", "t11"), ("b", "e7"), ("b", "i8"), ("b", "i7")]  # the baseline first
    assert ("t11", "e7") in pairs and ("e7", "i8") in pairs  # within 5 % of each other's GMACs
    assert ("e7", "i7") in pairs  # the same keep rate
    assert ("t8", "t11") in pairs and ("i8", "i7") in pairs  # neighbouring settings of one reducer
    assert ("t8", "e7") not in pairs  # 0.932 vs 0.824 GMACs: not comparable cost
    assert len(pairs) == len(set(pairs))
