"""torchrun: exact rows on contiguous unpadded shards, one error for all ranks, resume after a
crashed rank, and webdataset tar shards. Real processes (gloo on this CPU) and the shared images."""

from __future__ import annotations

import csv
import gzip
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ipbench.measure.exact import ExactSum
from ipbench.runs.world import World

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "torchrun_commands.py"
IGNORED = {"timestamp", "threads", "device_name"}  # who measured, not what was measured
TIMEOUT = 300


def env(checkpoint: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "IPBENCH_DATA")}
    e.update(IPBENCH_CHECKPOINT=str(checkpoint), OMP_NUM_THREADS="1", COLUMNS="200")
    return e


def torchrun(nproc: int, *args: str) -> list[str]:
    # --standalone: a free port for each launch (tests may run side by side)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            *args]


def rows_of(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def what(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k not in IGNORED} for r in rows]


# -- pure parts -------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 7, 100, 1000, 1001])
@pytest.mark.parametrize("size", [1, 2, 3, 8])
def test_shards_are_contiguous_unpadded_and_cover_every_image(n: int, size: int) -> None:
    if n < size:
        return
    parts = [World(rank=r, size=size).shard(n) for r in range(size)]
    assert [i for p in parts for i in p] == list(range(n))  # each image once, in order
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_exact_sum_does_not_depend_on_the_split() -> None:
    rng = random.Random(0)
    values = [rng.uniform(-1, 1) * 10 ** rng.randint(-8, 3) for _ in range(5000)]
    whole = ExactSum(values).value
    assert whole == math.fsum(values)
    assert sum(values) != whole  # a plain running sum would not be exact here
    for cut in (1, 333, 2500, 4999):
        assert (ExactSum(values[cut:]) + ExactSum(values[:cut])).value == whole


# -- real processes ---------------------------------------------------------------------------

COMMANDS = [
    "eval --reducer tome:r=13 --limit 100",
    "sweep --reducers tome,evit --keep-rates 0.7 --no-speed --limit 50",
    "robustness --reducers evit --masks 20 --limit 32",
    "similarity --reducers tome:r=13 --limit 32",
]


@pytest.fixture(scope="module")
def single_rows(tmp_path_factory: pytest.TempPathFactory, checkpoint_path: Path, data_path: Path) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("single")
    cmds = [f"{c} --data {data_path} --out {out}" for c in COMMANDS]
    done = subprocess.run([sys.executable, str(DRIVER), *cmds], env=env(checkpoint_path), capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    found: dict[str, Any] = {p.stem: rows_of(p) for p in out.glob("*.csv")}
    found["predictions"] = {p.name.removesuffix(".csv.gz"): gzip.decompress(p.read_bytes())
                            for p in (out / "predictions").iterdir()}
    return found


@pytest.mark.parametrize("nproc", [3])  # 3 divides none of the image counts (2 ranks: the tests below)
def test_torchrun_rows_equal_the_single_process_rows(nproc: int, single_rows: dict[str, Any],
                                                     tmp_path: Path, checkpoint_path: Path, data_path: Path) -> None:
    cmds = [f"{c} --data {data_path} --out {tmp_path}" for c in COMMANDS]
    done = subprocess.run(torchrun(nproc, str(DRIVER), *cmds), env=env(checkpoint_path), capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert set(single_rows) == {"eval", "sweep", "robustness", "similarity", "predictions"}
    for command in ("eval", "sweep", "robustness", "similarity"):
        rows = single_rows[command]
        assert what(rows_of(tmp_path / f"{command}.csv")) == what(rows), command
    # and every image's record (eval, sweep, robustness), gathered in the data's order
    records = {p.name.removesuffix(".csv.gz"): gzip.decompress(p.read_bytes())
               for p in (tmp_path / "predictions").iterdir()}
    assert len(records) == 1 + 3 + 2 and records == single_rows["predictions"]
    # and the numbers are real: ToMe r=13 on the first 100 images is 84/100 (tests/reference)
    assert rows_of(tmp_path / "eval.csv")[0]["correct1"] == "84"


def _bad_folder(data_path: Path, root: Path, n: int, bad: int) -> Path:
    """The first n shared images (class folders in order) with image number `bad` overwritten."""
    folder = root / "data"
    copied = 0
    for d in sorted(p for p in data_path.iterdir() if p.is_dir()):
        for f in sorted(d.iterdir()):
            if copied == n:
                break
            (folder / d.name).mkdir(parents=True, exist_ok=True)
            target = folder / d.name / f.name
            if copied == bad:
                target.write_bytes(b"not an image")
            else:
                shutil.copy(f, target)
            copied += 1
    return folder


def test_a_bad_image_on_one_rank_stops_every_rank_with_one_error_line(tmp_path: Path, checkpoint_path: Path,
                                                                       data_path: Path) -> None:
    folder = _bad_folder(data_path, tmp_path, 24, bad=20)  # in rank 1's shard of 2
    out = tmp_path / "out"
    done = subprocess.run(torchrun(2, "-m", "ipbench", "sweep", "--reducers", "tome", "--keep-rates", "0.7",
                                   "--no-speed", "--data", str(folder), "--out", str(out)),
                          env=env(checkpoint_path), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert errors[0].startswith("error: rank 1: cannot read image") and "--skip-bad" in errors[0]
    # torchrun adds its own launcher report (ChildFailedError); no ipbench frame is in it
    assert not [line for line in done.stderr.splitlines() if "File" in line and "/ipbench/" in line]
    assert not (out / "sweep.csv").exists() or rows_of(out / "sweep.csv") == []
    # with --skip-bad the same launch measures the 23 readable images, as one process does
    done = subprocess.run(torchrun(2, "-m", "ipbench", "eval", "--skip-bad", "--data", str(folder), "--out",
                                   str(out)), env=env(checkpoint_path), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = rows_of(out / "eval.csv")
    assert row["num_images"] == "23" and row["skipped_images"] == "1"


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=rank under `parent` (read from /proc)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == parent:
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and _is_descendant(int(proc.name), parent):
            return int(proc.name)
    return None


def _is_descendant(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
    return False


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_a_crashed_rank_leaves_whole_rows_and_the_rerun_resumes(tmp_path: Path, checkpoint_path: Path,
                                                                data_path: Path) -> None:
    out = tmp_path / "out"
    args = ["-m", "ipbench", "robustness", "--reducers", "tome:r=13,evit", "--masks", "20", "--limit", "60",
            "--data", str(data_path), "--out", str(out)]
    launcher = subprocess.Popen(torchrun(2, *args), env=env(checkpoint_path), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    csv_path = out / "robustness.csv"
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and launcher.poll() is None:
        if csv_path.exists() and len(rows_of(csv_path)) >= 1:
            break
        time.sleep(0.2)
    victim = _rank_pid(launcher.pid, 1)
    assert victim is not None and launcher.poll() is None, "the run ended before a rank could be killed"
    os.kill(victim, signal.SIGKILL)
    launcher.communicate(timeout=TIMEOUT)
    assert launcher.returncode != 0
    text = csv_path.read_text()
    assert text.endswith("\n")
    kept = rows_of(csv_path)
    assert 1 <= len(kept) < 3 and all(None not in r.values() and "" != r["correct1"] for r in kept)

    done = subprocess.run(torchrun(2, *args), env=env(checkpoint_path), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = rows_of(csv_path)
    assert len(rows) == 3 and len({r["config_key"] for r in rows}) == 3  # nothing measured twice
    assert rows[:len(kept)] == kept
    assert f"{3 - len(kept)} row(s) measured, {len(kept)} already in the CSV" in " ".join(done.stdout.split())


# -- tar shards -------------------------------------------------------------------------------

def test_tar_shards_give_the_folders_counts(tmp_path: Path, checkpoint_path: Path, data_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from make_shards import write_shards
    finally:
        sys.path.pop(0)
    from typer.testing import CliRunner

    from ipbench.cli import app

    paths = write_shards(data_path, tmp_path / "shards", 4)
    assert [p.name for p in paths] == [f"val-{i:06d}.tar" for i in range(4)]
    pattern = str(tmp_path / "shards" / "val-{000000..000003}.tar")
    runner = CliRunner()
    for data in (str(data_path), pattern):
        result = runner.invoke(app, ["eval", "--checkpoint", str(checkpoint_path), "--data", data, "--limit", "120",
                                     "--out", str(tmp_path / "out")])
        assert result.exit_code == 0, result.output
    folder, shards = rows_of(tmp_path / "out" / "eval.csv")
    assert shards["num_images"] == folder["num_images"] == "120"
    assert (shards["correct1"], shards["correct5"]) == (folder["correct1"], folder["correct5"])
    result = runner.invoke(app, ["eval", "--data", str(tmp_path / "shards" / "val-{000000..000009}.tar"),
                                 "--weights", "random", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "shard not found" in result.output
