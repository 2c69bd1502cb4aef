"""Ctrl-C anywhere keeps whole rows only, exits 130, and the rerun resumes where it stopped:
while streaming images, while timing, inside an analysis, inside a recipe's step."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from typer.testing import CliRunner

from ipbench.cli import app
from ipbench.runs import sweep as sw
from ipbench.runs.analyses import common

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(args: list[str]) -> Result:
    return runner.invoke(app, args, env={"IPBENCH_CHECKPOINT": None, "IPBENCH_DATA": None, "COLUMNS": "200"})


def rows_of(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def assert_interrupted(result: Result) -> None:
    assert result.exit_code == 130, result.output
    assert "interrupted; rows written so far are kept" in result.stderr
    assert "Traceback" not in result.output


def interrupt_after(monkeypatch: pytest.MonkeyPatch, module: Any, passes: int, batches: int = 0) -> list[int]:
    """Make `module.run_jobs` raise KeyboardInterrupt in its pass number `passes` (1-based), after
    `batches` batches of that pass."""
    real = module.run_jobs
    calls: list[int] = []

    def flaky(ctx: Any, source: Any, jobs: list, *a: Any, **kw: Any) -> Any:
        calls.append(len(jobs))
        if len(calls) < passes:
            return real(ctx, source, jobs, *a, **kw)

        def cut() -> Iterator[Any]:
            for i, batch in enumerate(source):
                if i == batches:
                    raise KeyboardInterrupt
                yield batch

        return real(ctx, cut(), jobs, *a, **kw)

    monkeypatch.setattr(module, "run_jobs", flaky)
    return calls


def test_interrupted_while_streaming_writes_nothing_then_resumes(checkpoint_path: Path, data_path: Path,
                                                                 tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["sweep", "--checkpoint", str(checkpoint_path), "--data", str(data_path), "--limit", "8", "--reducers",
            "evit", "--keep-rates", "0.7,0.5", "--no-speed", "--batch-size", "2", "--workers", "0",
            "--max-decoded-mib", "1", "--out", str(tmp_path)]  # 8 images (1.2 MB) do not fit in 1 MiB: streamed
    calls = interrupt_after(monkeypatch, sw, passes=1, batches=2)
    assert_interrupted(invoke(args))
    assert calls == [3]  # one streamed pass, every configuration on each batch
    assert rows_of(tmp_path / "sweep.csv") == []  # streamed rows are written at the end: none half-counted
    monkeypatch.undo()
    done = invoke(args)
    assert done.exit_code == 0, done.output
    rows = rows_of(tmp_path / "sweep.csv")
    assert [r["keep_rate"] for r in rows] == ["", "0.7", "0.5"] and all(r["num_images"] == "8" for r in rows)


def test_interrupted_while_timing_writes_no_half_timed_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ipbench.measure import throughput

    def interrupted(*a: Any, **kw: Any) -> Any:
        raise KeyboardInterrupt

    args = ["sweep", "--weights", "random", "--data", "synthetic", "--limit", "2", "--batch-size", "2",
            "--reducers", "topk", "--keep-rates", "0.5", "--repeats", "1", "--min-seconds", "0", "--warmup", "1",
            "--out", str(tmp_path)]
    monkeypatch.setattr(throughput, "measure_throughput", interrupted)
    assert_interrupted(invoke(args))
    assert rows_of(tmp_path / "sweep.csv") == []
    assert_interrupted(invoke(["speed", "--weights", "random", "--data", "synthetic", "--batch-size", "2",
                               "--reducers", "topk", "--out", str(tmp_path)]))
    assert rows_of(tmp_path / "speed.csv") == []
    monkeypatch.undo()
    done = invoke(args)
    assert done.exit_code == 0, done.output
    assert [r["reducer"] for r in rows_of(tmp_path / "sweep.csv")] == ["none", "topk"]


def test_interrupted_analysis_keeps_finished_rows_and_resumes(checkpoint_path: Path, data_path: Path,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["robustness", "--checkpoint", str(checkpoint_path), "--data", str(data_path), "--limit", "4",
            "--batch-size", "2", "--masks", "7,25", "-r", "evit", "--workers", "0", "--out", str(tmp_path)]
    interrupt_after(monkeypatch, common, passes=3, batches=1)  # in the third pass: evit at 7 masks
    assert_interrupted(invoke(args))
    first = rows_of(tmp_path / "robustness.csv")
    assert [(r["reducer"], r["mask_count"]) for r in first] == [("none", "7"), ("none", "25")]
    monkeypatch.undo()
    again = invoke(args)
    assert again.exit_code == 0 and "2 already in the CSV" in again.stdout, again.output
    rows = rows_of(tmp_path / "robustness.csv")
    assert rows[:2] == first and len({r["config_key"] for r in rows}) == 4

    trace_args = ["similarity", "--checkpoint", str(checkpoint_path), "--data", str(data_path), "--limit", "2",
                  "--batch-size", "2", "-r", "tome:r=13,imagepiece", "--workers", "0", "--out", str(tmp_path)]
    interrupt_after(monkeypatch, common, passes=2)  # in imagepiece's pass
    assert_interrupted(invoke(trace_args))
    assert {r["reducer"] for r in rows_of(tmp_path / "similarity.csv")} == {"tome"}
    monkeypatch.undo()
    assert invoke(trace_args).exit_code == 0
    assert {r["reducer"] for r in rows_of(tmp_path / "similarity.csv")} == {"tome", "imagepiece"}


def test_interrupted_recipe_stops_with_130(checkpoint_path: Path, data_path: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    interrupt_after(monkeypatch, sw, passes=2)
    result = invoke(["reproduce", str(REPO / "recipes" / "table1.toml"), "--checkpoint", str(checkpoint_path),
                     "--data", str(data_path), "--limit", "4", "--out", str(tmp_path), "--set", "speed=false",
                     "--no-plot"])
    assert_interrupted(result)
    assert [r["reducer"] for r in rows_of(tmp_path / "sweep.csv")] == ["none"]
    assert not (tmp_path / "table1.md").exists()
