"""Result CSVs that survive damage (a cut last row, a broken row) and concurrent writers."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ipbench import csvfile, results
from ipbench.errors import UserError

COLUMNS = ["timestamp", "config_key", "model", "top1", "ipbench"]


def _row(i: int) -> dict[str, str]:
    return {"timestamp": f"t{i}", "config_key": f"key{i:03d}", "model": "deit_s", "top1": f"{70 + i}.5",
            "ipbench": "0.3.1"}


def _line(i: int) -> bytes:
    return csvfile._csv_line([_row(i)[c] for c in COLUMNS]).encode()


def _three_rows(tmp_path: Path) -> Path:
    for i in range(3):
        results.append_row(tmp_path / "sweep.csv", _row(i), COLUMNS)
    return tmp_path / "sweep.csv"


def _assert_well_formed(path: Path, n_rows: int) -> list[list[str]]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    parsed = list(csv.reader(data.decode().splitlines()))
    assert parsed[0] == COLUMNS
    assert all(len(r) == len(COLUMNS) for r in parsed)
    assert len(parsed) == n_rows + 1
    return parsed[1:]


def test_cut_last_row_is_not_done_and_is_moved_aside(tmp_path: Path) -> None:
    path = _three_rows(tmp_path)
    good = path.read_bytes()
    broken = _line(3)[:17]  # half a row, no newline: a crash in the middle of the write
    with path.open("ab") as f:
        f.write(broken)

    assert results.existing_keys(path) == {"key000", "key001", "key002"}
    assert list(results.rows_by_key(path)) == ["key000", "key001", "key002"]
    assert [r["config_key"] for r in results.last_rows(path, ["key000", "key003"])] == ["key000"]

    with pytest.warns(results.DamagedRows) as caught:
        assert results.prepare_csv(tmp_path, "sweep", COLUMNS) == path
    assert len(caught) == 1
    message = str(caught[0].message)
    assert str(path) in message and "sweep.csv.damaged" in message
    assert f"{len(broken)} bytes, 1 line" in message
    assert path.read_bytes() == good
    assert results.damaged_path(path) == tmp_path / "sweep.csv.damaged"
    assert (tmp_path / "sweep.csv.damaged").read_bytes() == broken + b"\n"

    results.append_row(path, _row(3), COLUMNS)
    rows = _assert_well_formed(path, 4)
    assert [r[1] for r in rows] == ["key000", "key001", "key002", "key003"]
    frame = results.read_rows(path)
    assert list(frame["config_key"]) == ["key000", "key001", "key002", "key003"]


def test_next_append_repairs_a_cut_tail_itself(tmp_path: Path) -> None:
    path = _three_rows(tmp_path)
    with path.open("ab") as f:
        f.write(b"t3,key003,dei")
    with pytest.warns(results.DamagedRows, match=r"13 bytes, 1 line"):
        results.append_row(path, _row(3), COLUMNS)
    assert [r[1] for r in _assert_well_formed(path, 4)] == ["key000", "key001", "key002", "key003"]
    assert (tmp_path / "sweep.csv.damaged").read_bytes() == b"t3,key003,dei\n"


def test_repair_tail_returns_its_message_and_is_idempotent(tmp_path: Path) -> None:
    path = _three_rows(tmp_path)
    assert results.repair_tail(path) is None
    assert results.repair_tail(tmp_path / "missing.csv") is None
    with path.open("ab") as f:
        f.write(b"t3,key003")
    with pytest.warns(results.DamagedRows):
        message = results.repair_tail(path)
    assert message is not None and "9 bytes, 1 line" in message and str(path) in message
    assert results.repair_tail(path) is None
    _assert_well_formed(path, 3)


def test_last_row_with_too_few_fields_and_a_newline_is_moved_aside(tmp_path: Path) -> None:
    path = _three_rows(tmp_path)
    good = path.read_bytes()
    broken = b"t3,key003,deit_s\n"
    with path.open("ab") as f:
        f.write(broken)

    assert results.existing_keys(path) == {"key000", "key001", "key002"}
    with pytest.warns(results.DamagedRows, match=r"3 fields, not 5") as caught:
        results.prepare_csv(tmp_path, "sweep", COLUMNS)
    assert f"{len(broken)} bytes, 1 line" in str(caught[0].message)
    assert path.read_bytes() == good
    assert (tmp_path / "sweep.csv.damaged").read_bytes() == broken  # it had its newline: kept as it was


def test_complete_last_row_without_newline_counts_as_cut(tmp_path: Path) -> None:
    # ipbench writes a row and its newline in one write, so a missing newline means the write was cut,
    # possibly inside the last field ("0.3.1" -> "0.3" still has 5 fields): the row is not trusted.
    path = _three_rows(tmp_path)
    good = path.read_bytes()
    with path.open("ab") as f:
        f.write(_line(3).rstrip(b"\n"))

    assert "key003" not in results.existing_keys(path)
    with pytest.warns(results.DamagedRows, match="no newline"):
        assert len(results.read_rows(path)) == 3
    with pytest.warns(results.DamagedRows, match="no newline"):
        results.prepare_csv(tmp_path, "sweep", COLUMNS)
    assert path.read_bytes() == good
    assert (tmp_path / "sweep.csv.damaged").read_bytes() == _line(3)


def _written_by_hand(path: Path, *lines: bytes) -> Path:
    path.write_bytes(csvfile._csv_line(COLUMNS).encode() + b"".join(lines))
    return path


def test_bad_row_in_the_middle_is_skipped_but_left_in_place(tmp_path: Path) -> None:
    path = _written_by_hand(tmp_path / "sweep.csv", _line(0),
                            b"t1,key001,deit_s,71.5,0.3.1,surplus\n",  # one field too many
                            b"t2,key002\n",  # too few
                            _line(3))
    before = path.read_bytes()

    assert set(results.rows_by_key(path)) == {"key000", "key003"}
    with pytest.warns(results.DamagedRows, match=r"2 damaged rows skipped \(line 3: 6 fields, not 5; line 4: 2 fields"):
        frame = results.read_rows(path)
    assert list(frame["config_key"]) == ["key000", "key003"]
    assert list(frame["top1"]) == [70.5, 73.5]
    with pytest.warns(results.DamagedRows, match="2 damaged rows skipped"):
        results.prepare_csv(tmp_path, "sweep", COLUMNS)
    results.append_row(path, _row(4), COLUMNS)
    assert path.read_bytes() == before + _line(4)  # only a damaged tail is repaired
    assert not (tmp_path / "sweep.csv.damaged").exists()


def test_stray_quote_does_not_swallow_the_rows_after_it(tmp_path: Path) -> None:
    path = _written_by_hand(tmp_path / "sweep.csv", _line(0), b't1,"key001,deit_s,71.5,0.3.1\n', _line(2), _line(3))
    assert set(results.rows_by_key(path)) == {"key000", "key002", "key003"}
    assert results.repair_tail(path) is None


def test_quoted_newline_in_a_field_is_one_row(tmp_path: Path) -> None:
    path = tmp_path / "sweep.csv"
    results.append_row(path, {**_row(0), "model": "two\nlines, quoted"}, COLUMNS)
    results.append_row(path, _row(1), COLUMNS)
    assert results.rows_by_key(path)["key000"]["model"] == "two\nlines, quoted"
    assert results.repair_tail(path) is None
    assert list(results.read_rows(path)["config_key"]) == ["key000", "key001"]


def test_repeated_header_is_no_row(tmp_path: Path) -> None:
    # what two writers racing on a new file left before the lock
    path = _written_by_hand(tmp_path / "sweep.csv", _line(0), csvfile._csv_line(COLUMNS).encode(), _line(1))
    assert set(results.rows_by_key(path)) == {"key000", "key001"}
    with pytest.warns(results.DamagedRows, match="line 3: the header again"):
        assert list(results.read_rows(path)["top1"]) == [70.5, 71.5]


def test_cut_first_write_leaves_a_fresh_file(tmp_path: Path) -> None:
    path = tmp_path / "sweep.csv"
    path.write_bytes(csvfile._csv_line(COLUMNS).encode()[:10])
    assert results.rows_by_key(path) == {}
    with pytest.warns(results.DamagedRows, match="10 bytes, 1 line"):
        results.append_row(path, _row(0), COLUMNS)
    assert [r[1] for r in _assert_well_formed(path, 1)] == ["key000"]


def test_other_columns_and_broken_first_line_are_refused_untouched(tmp_path: Path) -> None:
    path = _three_rows(tmp_path)
    with path.open("ab") as f:
        f.write(b"t3,key")
    before = path.read_bytes()
    with pytest.raises(UserError, match="different columns"):  # a column gone: no older schema of these
        results.prepare_csv(tmp_path, "sweep", [*COLUMNS[:-1], "extra"])
    with pytest.raises(UserError, match="different columns"):  # more missing than was added since
        results.prepare_csv(tmp_path, "sweep", [*COLUMNS, "extra"])
    with pytest.raises(UserError, match="different columns"):  # the same columns in another order
        results.prepare_csv(tmp_path, "sweep", [*reversed(COLUMNS), "extra"])
    assert path.read_bytes() == before

    other = tmp_path / "latin.csv"
    other.write_bytes("caf\xe9,b\n1,2\n".encode("latin-1"))
    with pytest.raises(UserError, match="first line is no CSV header"):
        results.append_row(other, {"a": 1}, ["a"])
    assert other.read_bytes() == "caf\xe9,b\n1,2\n".encode("latin-1")


def test_clean_file_reads_without_warning(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    path = _three_rows(tmp_path)
    results.prepare_csv(tmp_path, "sweep", COLUMNS)
    assert len(results.read_rows(path)) == 3
    assert not [w for w in recwarn if issubclass(w.category, results.DamagedRows)]
    assert (tmp_path / "sweep.csv.lock").exists()
    assert not (tmp_path / "sweep.csv.damaged").exists()


_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from ipbench import results
    path, start, worker, rows = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    columns = sys.argv[5].split(",")
    (start.parent / f"ready{worker}").touch()
    while not start.exists():
        time.sleep(0.001)
    for i in range(rows):
        results.append_row(path, {"timestamp": i, "config_key": f"w{worker}r{i}", "model": "deit_s",
                                  "top1": "x,y", "ipbench": worker}, columns)
""")


def test_concurrent_writers_write_one_header_and_whole_rows(tmp_path: Path) -> None:
    workers, rows = 8, 20
    path, start = tmp_path / "out" / "sweep.csv", tmp_path / "start"
    args = [str(path), str(start)]
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, *args, str(w), str(rows), ",".join(COLUMNS)])
             for w in range(workers)]
    try:
        for w in range(workers):  # every writer imported ipbench and waits: then all start at once
            while not (tmp_path / f"ready{w}").exists():
                assert procs[w].poll() is None, f"writer {w} died"
                time.sleep(0.01)
        start.touch()
        assert [p.wait(timeout=120) for p in procs] == [0] * workers
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()

    data = path.read_bytes()
    assert data.endswith(b"\n")
    assert data.count(csvfile._csv_line(COLUMNS).encode()) == 1
    parsed = list(csv.reader(data.decode().splitlines()))
    assert parsed[0] == COLUMNS
    assert len(parsed) == 1 + workers * rows
    assert all(len(r) == len(COLUMNS) and r[3] == "x,y" for r in parsed[1:])
    expected = {f"w{w}r{i}" for w in range(workers) for i in range(rows)}
    assert results.existing_keys(path) == expected
    assert len(results.read_rows(path)) == workers * rows
    assert not (path.parent / "sweep.csv.damaged").exists()


def test_ipbench_commands_sharing_one_out_write_one_header(tmp_path: Path) -> None:
    """Four real `ipbench flops` processes started at once on a new --out: one header, every row whole."""
    cmd = [sys.executable, "-m", "ipbench", "flops", "--weights", "random", "--data", "synthetic", "--images", "1",
           "--reducers", "tome", "--out", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k not in ("IPBENCH_CHECKPOINT", "IPBENCH_DATA")}
    procs = [subprocess.Popen(cmd, env={**env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    lines = (tmp_path / "flops.csv").read_text().splitlines()
    assert sum(line.startswith("timestamp,config_key") for line in lines) == 1
    rows = list(csv.DictReader(io.StringIO("\n".join(lines) + "\n")))
    assert len(rows) == 8 and all(None not in r and None not in r.values() for r in rows)
    assert sorted({r["reducer"] for r in rows}) == ["none", "tome"]


def _old_sweep(tmp_path: Path, rows: list[dict[str, str]]) -> Path:
    """A sweep.csv as ipbench wrote it before the interval columns existed."""
    old = [c for c in results.SWEEP_COLUMNS if c not in results.ACCURACY_INTERVAL_COLUMNS]
    path = tmp_path / "sweep.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, old, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_a_file_of_an_older_schema_gains_the_interval_columns_from_its_own_counts(tmp_path: Path) -> None:
    rows = [{"config_key": "k1", "num_images": "1000", "top1": "86.7", "top5": "97.6", "correct1": "867",
             "correct5": "976"},
            {"config_key": "k2", "num_images": "200", "top1": "0.0", "top5": "0.0", "correct1": "0",
             "correct5": "0"},  # nothing right: n from the images counted
            {"config_key": "k3", "num_images": "", "top1": "", "top5": "", "correct1": "", "correct5": ""},
            {"config_key": "k4", "num_images": "64", "top1": "85.938", "top5": "100.0", "correct1": "55",
             "correct5": "64"}]
    path = _old_sweep(tmp_path, rows)
    before = path.read_bytes()
    with pytest.warns(results.UpgradedColumns, match=r"4 rows gained the columns n_labelled, top1_low, top1_high, "
                                                     r"top5_low, top5_high .*kept as sweep.csv.old"):
        results.prepare_csv(tmp_path, "sweep", results.SWEEP_COLUMNS)
    assert (tmp_path / "sweep.csv.old").read_bytes() == before
    new = results.read_rows(path)
    assert list(new.columns) == results.SWEEP_COLUMNS
    assert list(new["n_labelled"].fillna(-1)) == [1000, 200, -1, 64]
    # Wilson's 95 % interval, (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), by hand: 84.4542, 88.6649
    assert (new.loc[0, "top1_low"], new.loc[0, "top1_high"]) == (84.454, 88.665)
    assert (new.loc[1, "top1_low"], new.loc[1, "top1_high"]) == (0.0, 1.885)
    assert (new.loc[3, "top5_low"], new.loc[3, "top5_high"]) == (94.338, 100.0)
    assert new["top1_low"].isna()[2]
    assert list(new["top1"].fillna(-1)) == [86.7, 0.0, -1, 85.938]  # old cells kept as they were
    assert results.existing_keys(path) == {"k1", "k2", "k3", "k4"}  # and the rows still resume
    results.prepare_csv(tmp_path, "sweep", results.SWEEP_COLUMNS)  # once upgraded: nothing more to do
    results.append_row(path, {"config_key": "k5", **results.accuracy_fields(3, 4, 4)}, results.SWEEP_COLUMNS)
    assert not (tmp_path / "sweep.csv.old2").exists() and len(results.read_rows(path)) == 5


def test_accuracy_fields_are_the_counts_and_their_wilson_interval() -> None:
    f = results.accuracy_fields(867, 976, 1000)
    assert f == {"top1": 86.7, "top5": 97.6, "correct1": 867, "correct5": 976, "n_labelled": 1000,
                 "top1_low": 84.454, "top1_high": 88.665, "top5_low": 96.454, "top5_high": 98.382}
    assert set(results.accuracy_fields(0, 0, 0).values()) == {""}


def test_upgrading_an_attentiveness_file_names_the_score_its_rows_used(tmp_path: Path) -> None:
    old = [c for c in results.ATTENTIVENESS_COLUMNS if c != "score"]
    path = tmp_path / "attentiveness.csv"
    path.write_text(",".join(old) + "\n" + ",".join("k1" if c == "config_key" else "" for c in old) + "\n")
    with pytest.warns(results.UpgradedColumns, match="1 row gained the columns score"):
        results.prepare_csv(tmp_path, "attentiveness", results.ATTENTIVENESS_COLUMNS)
    assert list(results.read_rows(path)["score"]) == ["token"]
