"""Result CSV files as files: whole-row appends, damaged rows, and the lock that serialises writers.

Damage. A row is well formed when it ends with a newline, parses, has as many fields as the header
and is not a repeated header line. Readers (`rows_by_key`, `existing_keys`, `last_rows`, `read_rows`)
use only well-formed rows, so a row cut off by a crash or an interrupted copy never counts as a
finished configuration, and a rerun measures it again. A final line without its newline counts as
damaged even when its fields parse: ipbench writes the newline in the same ``write`` as the row, so
its absence means the write was cut, possibly inside the last field, which cannot be told apart.
Only the damaged TAIL (everything after the last well-formed row, once any of it is damaged) is
repaired, by `repair_tail`, before every append and in `prepare_csv`: its bytes are appended to
``<name>.csv.damaged`` (plus a newline where they lacked one) and cut from the CSV. A damaged row in
the middle is skipped by the readers but left in place.

Every repair, and `read_rows` skipping damaged rows, is reported once with
``warnings.warn(message, DamagedRows)``: one line that names the file and what was moved or skipped.
`repair_tail` also returns its message, for a caller that prints it itself.

Concurrency. Check-header-then-append and the repair hold an advisory lock, ``<name>.csv.lock``
beside the CSV (the `filelock` package), so any number of processes can append to one folder: the
header is written once, and every row stays a whole line.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipbench.errors import UserError


def _csv_line(values: list[Any]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue()


class FileNotice(UserWarning):
    """Something ipbench did to a result file that the user must hear of (one line each)."""


class DamagedRows(FileNotice):
    """A result CSV had damaged rows: its tail was moved to ``<name>.csv.damaged``, or rows were skipped."""


class UpgradedColumns(FileNotice):
    """A result CSV of an older ipbench gained the columns added since; the old file was kept beside it."""


Derive = Callable[[dict[str, str], list[str]], dict[str, Any]]  # (old row, missing columns) -> their values


LOCK_TIMEOUT_S = 600.0  # an append holds the lock for milliseconds; this long means a stuck holder


def _lock_path(file: Path) -> Path:
    return file.with_name(file.name + ".lock")


def damaged_path(file: str | os.PathLike) -> Path:
    """Where `repair_tail` moves the damaged tail of `file`: ``<name>.csv.damaged`` beside it."""
    path = Path(file)
    return path.with_name(path.name + ".damaged")


@contextmanager
def _locked(file: Path) -> Iterator[None]:
    """Hold ``<name>.csv.lock`` (an advisory lock every ipbench writer of this CSV takes)."""
    from filelock import FileLock, Timeout

    try:
        with FileLock(str(_lock_path(file)), timeout=LOCK_TIMEOUT_S):
            yield
    except Timeout:
        raise UserError(f"{file}: another process has held {_lock_path(file).name} for {LOCK_TIMEOUT_S:.0f} s; "
                        "is an ipbench command stuck?") from None


@dataclass
class _Scan:
    """A result CSV split into records (a record is one row; a quoted field may span lines)."""

    header: list[str] | None = None  # None: empty file, or its first line is itself damaged
    unreadable: str | None = None  # why the first line, followed by others, is no header (not a result CSV)
    rows: list[list[str]] = field(default_factory=list)  # the well-formed rows, in file order
    good_end: int = 0  # byte offset after the last well-formed record (the header included)
    bad: list[tuple[int, int, int, str]] = field(default_factory=list)  # (start, end, line number, why)
    size: int = 0

    def tail(self) -> tuple[int, int] | None:
        """(start, end) of the damaged tail: everything after the last good record, if any of it is bad."""
        if self.bad and self.bad[-1][0] >= self.good_end:
            return self.good_end, self.size
        return None


def _records(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(start, end, first line number) of each record: lines joined while a quote is open.

    A line whose quote never closes (a stray quote, a cut) is a record of its own, so one damaged line
    cannot swallow the rest of the file.
    """
    starts = [0]
    pos = data.find(b"\n")
    while pos != -1:
        starts.append(pos + 1)
        pos = data.find(b"\n", pos + 1)
    if starts[-1] == len(data):
        starts.pop()
    ends = [*starts[1:], len(data)]
    i = 0
    while i < len(starts):
        quotes = data.count(b'"', starts[i], ends[i])
        j = i
        while quotes % 2 and j + 1 < len(starts):
            j += 1
            quotes += data.count(b'"', starts[j], ends[j])
        if quotes % 2:
            j = i  # never closed: this line alone, judged (and refused) on its own
        yield starts[i], ends[j], i + 1
        i = j + 1


def _parse(record: bytes) -> list[str] | None | str:
    """The fields of one record, None for a blank line, or why it is damaged (a str)."""
    if not record.endswith(b"\n"):
        return "no newline at the end (cut off)"
    try:
        text = record.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8"
    if not text.strip("\r\n"):
        return None
    try:
        parsed = list(csv.reader(io.StringIO(text, newline=""), strict=True))
    except csv.Error as exc:
        return f"does not parse ({exc})"
    if len(parsed) != 1:
        return "does not parse as one row"
    return parsed[0]


def _scan(file: Path) -> _Scan:
    """Split a result CSV into its header, its well-formed rows and its damaged records."""
    scan = _Scan()
    if not file.exists():
        return scan
    data = file.read_bytes()
    scan.size = len(data)
    for start, end, line in _records(data):
        fields = _parse(data[start:end])
        if fields is None:  # a blank line: neither a row nor damage
            continue
        if scan.header is None:
            if isinstance(fields, str):
                if end == len(data):  # the first write itself was cut: the whole file is a damaged tail
                    scan.bad.append((start, end, line, fields))
                else:  # lines follow a broken first line: no result CSV ipbench wrote, nothing to repair
                    scan.unreadable = f"line {line}: {fields}"
                return scan
            scan.header, scan.good_end = fields, end
            continue
        if isinstance(fields, str):
            scan.bad.append((start, end, line, fields))
        elif len(fields) != len(scan.header):
            scan.bad.append((start, end, line, f"{len(fields)} fields, not {len(scan.header)}"))
        elif fields == scan.header:
            scan.bad.append((start, end, line, "the header again"))
        else:
            scan.rows.append(fields)
            scan.good_end = end
    return scan


def _existing_header(path: Path) -> list[str] | None:
    """The header of a result CSV (None: no file, an empty one, or one whose first line is damaged)."""
    return _scan(path).header


def _refuse_other_columns(file: Path, header: list[str] | None, columns: list[str]) -> None:
    if header is not None and header != columns:
        raise UserError(f"{file} was written with different columns (an older ipbench or another command); "
                        "use another --out folder")


def _refuse_unreadable(file: Path, scan: _Scan, columns: list[str]) -> None:
    if scan.unreadable:
        raise UserError(f"{file}: its first line is no CSV header ({scan.unreadable}); use another --out folder")
    _refuse_other_columns(file, scan.header, columns)


def check_header(path: str | os.PathLike, columns: list[str]) -> None:
    """Refuse a CSV written with other columns now, before minutes of measuring, not at the first row."""
    file = Path(path)
    _refuse_unreadable(file, _scan(file), columns)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _repair(file: Path, scan: _Scan) -> str | None:
    """Move the damaged tail of `file` (the lock held) to <name>.csv.damaged; the message, or None."""
    tail = scan.tail()
    if tail is None:
        return None
    start, end = tail
    with file.open("r+b") as f:
        f.seek(start)
        broken = f.read(end - start)
        target = damaged_path(file)
        with target.open("ab") as out:  # first kept there, then cut here: a crash between loses nothing
            out.write(broken if broken.endswith(b"\n") else broken + b"\n")
            out.flush()
            os.fsync(out.fileno())
        f.truncate(start)
        f.flush()
        os.fsync(f.fileno())
    lines = broken.count(b"\n") + (not broken.endswith(b"\n"))
    damaged = [f"line {line}: {why}" for s, _, line, why in scan.bad if s >= start]
    what = "damaged last row" if len(damaged) == 1 else f"{len(damaged)} damaged last rows"
    return (f"{file}: {what} ({'; '.join(damaged)}) moved to {target.name} ({_plural(len(broken), 'byte')}, "
            f"{_plural(lines, 'line')}); {'it counts' if len(damaged) == 1 else 'they count'} as not measured "
            "(a rerun measures again)")


def repair_tail(path: str | os.PathLike) -> str | None:
    """Move a damaged tail of a result CSV to ``<name>.csv.damaged``, holding the CSV's lock.

    Returns the one-line message (also given as a `DamagedRows` warning), or None when the file has no
    damaged tail (or does not exist). A damaged row in the middle is left in place (readers skip it).
    """
    file = Path(path)
    if not file.exists():
        return None
    with _locked(file):
        message = _repair(file, _scan(file))
    if message:
        warnings.warn(message, DamagedRows, stacklevel=2)
    return message


def append_row(path: str | os.PathLike, row: dict[str, Any], columns: list[str]) -> None:
    """Append one complete row (writing the header first for a new file), flushed to disk.

    Holds the CSV's lock (``<name>.csv.lock``) from reading the header to the fsync, so concurrent
    writers write the header once; a damaged tail is moved aside first (`repair_tail`), so the row is
    never glued onto a broken line.
    """
    file = Path(path)
    unknown = set(row) - set(columns)
    if unknown:
        raise ValueError(f"row has fields outside the schema: {sorted(unknown)}")
    file.parent.mkdir(parents=True, exist_ok=True)
    text = _csv_line([row.get(c, "") for c in columns])
    message = None
    with _locked(file):
        if _sound(file, columns):  # the common case, without reading the whole file for each row
            new_file, message = not file.exists() or file.stat().st_size == 0, None
        else:
            scan = _scan(file)
            _refuse_unreadable(file, scan, columns)
            message = _repair(file, scan)  # after it the file is empty or ends with a newline
            new_file = scan.header is None
        if new_file:
            text = _csv_line(columns) + text
        with file.open("ab") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
    if message:
        warnings.warn(message, DamagedRows, stacklevel=2)


_TAIL_BYTES = 1 << 16


def _sound(file: Path, columns: list[str]) -> bool:
    """Whether `file` is missing or empty, or starts with `columns` and ends with a well-formed row
    (judged from its first and last lines only; False sends the caller to the full scan)."""
    if not file.exists():
        return True
    size = file.stat().st_size
    if size == 0:
        return True
    with file.open("rb") as f:
        first = f.readline()
        if first.count(b'"') % 2 or _parse(first) != columns:
            return False
        if f.tell() == size:
            return True
        start = max(f.tell(), size - _TAIL_BYTES)
        f.seek(start)
        chunk = f.read()
    cut = chunk.rfind(b"\n", 0, len(chunk) - 1)
    if cut == -1 and start > len(first):
        return False  # a last line longer than the chunk: let the full scan judge it
    last = chunk[cut + 1:]
    fields = _parse(last)
    return last.count(b'"') % 2 == 0 and isinstance(fields, list) and len(fields) == len(columns) and fields != columns


def _skipped_message(file: Path, bad: list[tuple[int, int, int, str]]) -> str:
    shown = "; ".join(f"line {line}: {why}" for _, _, line, why in bad[:3])
    more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
    return (f"{file}: {_plural(len(bad), 'damaged row')} skipped ({shown}{more}); "
            "left in the file (fix or delete it by hand)")


def old_path(file: str | os.PathLike) -> Path:
    """Where `check_file` keeps a CSV of older columns before upgrading it: ``<name>.csv.old``
    (``.old2``, ``.old3``, ... when that exists)."""
    path = Path(file)
    n = 1
    while (target := path.with_name(path.name + (".old" if n == 1 else f".old{n}"))).exists():
        n += 1
    return target


def _upgrade(file: Path, scan: _Scan, columns: list[str], derive: Derive) -> str:
    """Rewrite `file` (the lock held) with `columns`: every old row keeps its cells and gains the
    missing columns' values from `derive`; the old file is kept as `old_path`. The new file is
    written beside it and renamed, so a crash leaves the old or the new file, never half of one."""
    assert scan.header is not None
    missing = [c for c in columns if c not in scan.header]
    rows = []
    for fields in scan.rows:
        old = dict(zip(scan.header, fields))
        new = {**old, **{c: "" for c in missing}, **derive(old, missing)}
        rows.append([new.get(c, "") for c in columns])
    kept = old_path(file)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    tmp.write_text(as_text(columns, rows), encoding="utf-8")
    shutil.copy2(file, kept)  # the old file stays whole under its new name
    os.replace(tmp, file)
    dropped = f"; {_plural(len(scan.bad), 'damaged row')} left out (kept in {kept.name})" if scan.bad else ""
    return (f"{file}: written by an older ipbench; {_plural(len(rows), 'row')} gained the columns "
            f"{', '.join(missing)} (computed from their own cells){dropped}; the old file is kept as {kept.name}")


def _upgradable(header: list[str] | None, columns: list[str], added: frozenset[str]) -> bool:
    """An older schema: the header is `columns` in the same order without some of the `added` ones."""
    if header is None or header == columns:
        return False
    return [c for c in columns if c not in added or c in header] == header


def check_file(path: Path, columns: list[str], derive: Derive | None = None,
               added: frozenset[str] = frozenset()) -> None:
    """Before anything is measured: refuse a CSV with other columns (or, given `derive`, upgrade one
    of an older schema, `columns` without some of those `added` since, with an `UpgradedColumns`
    warning), move a damaged tail aside (a
    `DamagedRows` warning says so, and the configurations it held are measured again), and name
    damaged rows in the middle in a `DamagedRows` warning (left in place; readers skip them)."""
    if not path.exists():
        return
    with _locked(path):
        scan = _scan(path)
        if derive is not None and not scan.unreadable and _upgradable(scan.header, columns, added):
            warnings.warn(_upgrade(path, scan, columns, derive), UpgradedColumns, stacklevel=3)
            return
        _refuse_unreadable(path, scan, columns)
        message = _repair(path, scan)
    tail = scan.tail()
    middle = [b for b in scan.bad if tail is None or b[0] < tail[0]]
    if message:
        warnings.warn(message, DamagedRows, stacklevel=3)
    if middle:
        warnings.warn(_skipped_message(path, middle), DamagedRows, stacklevel=3)


def well_formed(path: Path) -> tuple[list[str] | None, list[list[str]], str | None]:
    """The header and the well-formed rows of a result CSV, and a message naming the damaged rows
    the readers skip (None when there are none)."""
    scan = _scan(path)
    skipped = _skipped_message(path, scan.bad) if scan.bad and scan.header is not None else None
    return scan.header, scan.rows, skipped


def as_text(header: list[str], rows: list[list[str]]) -> str:
    """The CSV text of a header and rows."""
    return _csv_line(header) + "".join(_csv_line(r) for r in rows)
