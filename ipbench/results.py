"""Result CSVs: fixed schemas, whole-row appends that survive a crash, and resume by config key.

Every command appends to ``<out>/<command>.csv``. A row is written in one ``write`` followed by
flush + fsync, so an interrupted run normally leaves complete rows only and can resume where it stopped.

The file layer (well-formed rows, damaged tails, the writers' lock) is `ipbench.csvfile`; the
columns of each file are `ipbench.schemas` (re-exported here). A file of an older schema is upgraded
before the first row is written (`prepare_csv`, `derive_missing`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ipbench.csvfile import (  # noqa: F401  (append_row, check_header, DamagedRows... are results' API)
    DamagedRows,
    FileNotice,
    UpgradedColumns,
    append_row,
    as_text,
    check_file,
    check_header,
    damaged_path,
    repair_tail,
    well_formed,
)
from ipbench.errors import UserError
from ipbench.schemas import (  # noqa: F401  (the schemas are results' API)
    ACCURACY_COLUMNS,
    ACCURACY_INTERVAL_COLUMNS,
    ADDED_COLUMNS,
    ATTENTIVENESS_COLUMNS,
    COHERENCE_COLUMNS,
    EVAL_COLUMNS,
    FINETUNE_COLUMNS,
    IMPORTANCE_COLUMNS,
    ROBUSTNESS_COLUMNS,
    SIMILARITY_COLUMNS,
    SPEED_DETAIL_COLUMNS,
    SWEEP_COLUMNS,
)

if TYPE_CHECKING:
    import pandas as pd

HASH_COLUMNS = ("config_key", "checkpoint_sha256")


def prepare_csv(out: str | os.PathLike, command: str, columns: list[str]) -> Path:
    """OUT/<command>.csv, once the folder is known to be writable and an existing file to have these
    columns (its damaged tail moved aside, a file of an older schema upgraded: `csvfile.check_file`
    with `derive_missing`), before anything is measured."""
    path = prepare_out(out) / f"{command}.csv"
    check_file(path, columns, derive_missing, ADDED_COLUMNS)
    return path


def accuracy_fields(correct1: int, correct5: int, n: int, digits: int = 3) -> dict[str, Any]:
    """The accuracy cells of a row: top1/top5 (percent), their counts, the sample size and the 95 %
    intervals (`ACCURACY_INTERVAL_COLUMNS`); all empty when no image was labelled (n = 0)."""
    from ipbench.stats import interval

    if n <= 0:
        return dict.fromkeys(ACCURACY_COLUMNS, "")
    lo1, hi1 = interval(correct1, n)
    lo5, hi5 = interval(correct5, n)
    return {"top1": cell(100.0 * correct1 / n, digits), "top5": cell(100.0 * correct5 / n, digits),
            "correct1": correct1, "correct5": correct5, "n_labelled": n,
            "top1_low": cell(lo1, digits), "top1_high": cell(hi1, digits),
            "top5_low": cell(lo5, digits), "top5_high": cell(hi5, digits)}


def labelled_count(row: dict[str, str]) -> int | None:
    """The labelled images an older row's top1/top5 rest on, recovered from its own cells: correct/top
    (exact while top has 3 decimals and n < 10^5), else (no image right) the images it counted;
    None for a row without counts."""
    if row.get("correct1", "") == "":
        return None
    for k in (1, 5):
        correct, top = row.get(f"correct{k}", ""), row.get(f"top{k}", "")
        if correct != "" and top != "" and float(top) > 0:
            return round(100.0 * float(correct) / float(top))
    images = row.get("num_images", "")
    return int(float(images)) if images != "" else None


def derive_missing(row: dict[str, str], missing: list[str]) -> dict[str, Any]:
    """Values for the columns an older ipbench did not write (`csvfile.check_file` upgrades with it):
    the accuracy intervals from the row's counts, and the attentiveness `score` its rows used (token)."""
    out: dict[str, Any] = {}
    if set(missing) & set(ACCURACY_INTERVAL_COLUMNS):
        n = labelled_count(row)
        if n is not None:
            fields = accuracy_fields(int(float(row["correct1"])), int(float(row["correct5"])), n)
            out.update({c: fields[c] for c in ACCURACY_INTERVAL_COLUMNS})
    if "score" in missing:
        out["score"] = "token"
    return out


PREDICTIONS = "predictions"  # OUT/predictions/<config_key>.csv.gz: one line per image of a row
PREDICTION_COLUMNS = ["image", "label", "pred1", "pred2", "pred3", "pred4", "pred5", "correct1", "correct5"]


def write_table(path: str | os.PathLike, rows: list[dict[str, Any]], columns: list[str]) -> Path:
    """Write a derived table whole (its rows come from other files, which resume): header and rows,
    replacing the file in one rename, so a reader never sees half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(as_text(columns, [["" if r.get(c) is None else str(r.get(c, "")) for c in columns] for r in rows]),
                   encoding="utf-8")
    os.replace(tmp, path)
    return path


def predictions_path(out: str | os.PathLike, key: str) -> Path:
    """Where the per-image records of the row with `key` lie."""
    return Path(out) / PREDICTIONS / f"{key}.csv.gz"


def write_predictions(out: str | os.PathLike, key: str, labels: list[int], top: list[list[int]]) -> Path:
    """Write one row's per-image records: image (its position among the measured images, in the
    data's fixed order), label (-1: none), the top-5 predicted classes, correct@1/@5 (empty without
    a label). gzip'd CSV: ``pandas.read_csv(path)`` reads it, no new dependency; written to a
    temporary name and renamed, so a file is whole or absent, and it is written before its row."""
    import gzip

    path = predictions_path(out, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{key}.{os.getpid()}.tmp")
    with gzip.open(tmp, "wt", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(PREDICTION_COLUMNS)
        for i, (label, classes) in enumerate(zip(labels, top)):
            padded = [*classes, *[""] * (5 - len(classes))]
            hits = ["", ""] if label < 0 else [int(classes[:1] == [label]), int(label in classes)]
            writer.writerow([i, label, *padded, *hits])
    os.replace(tmp, path)
    return path


def timm_benchmark_rows(rows: list[dict[str, Any]], img_size: int, param_count: int) -> list[dict[str, Any]]:
    """Speed rows under the column names of timm's benchmark CSVs, to set beside timm's own numbers:
    infer_step_time is milliseconds per batch (the batch over the median img/s), param_count in
    millions; `reducer` and `speedup` are ipbench's, appended."""
    out = []
    for r in rows:
        ips = float(r["img_s_median"])
        out.append({"model": r["model"], "infer_samples_per_sec": round(ips, 2),
                    "infer_step_time": round(1000.0 * int(r["batch_size"]) / ips, 3),
                    "infer_batch_size": int(r["batch_size"]), "infer_img_size": img_size,
                    "infer_gmacs": r.get("gmacs_analytic", ""), "param_count": round(param_count / 1e6, 2),
                    "reducer": r.get("reducer_label", r.get("reducer", "")), "speedup": r.get("speedup_median", "")})
    return out


def cell(value: float | None, digits: int) -> Any:
    """A number for a CSV cell: rounded, or empty where there is none (None or nan)."""
    if value is None or value != value:
        return ""
    return round(float(value), digits)


def read_rows(path: str | os.PathLike) -> pd.DataFrame:
    """All rows of a result CSV (an empty frame when the file does not exist yet).

    Damaged rows (see the module's docstring) are skipped, with a `DamagedRows` warning; nothing is
    repaired here (a reader may not own the folder)."""
    import pandas as pd

    file = Path(path)
    if not file.exists():
        return pd.DataFrame()
    # Hashes must stay strings: a hex prefix can look like a number ("12e4...").
    options: dict[str, Any] = {"keep_default_na": False, "na_values": [""], "dtype": {k: str for k in HASH_COLUMNS}}
    header, rows, skipped = well_formed(file)
    if header is None or skipped is None:  # nothing damaged, or no header: pandas reads (and judges) it all
        return pd.read_csv(file, **options)
    warnings.warn(skipped, DamagedRows, stacklevel=2)
    return pd.read_csv(io.StringIO(as_text(header, rows)), **options)


# Columns that tell the measurements of a CSV apart where it has no config_key (written by hand, or by
# another tool): the run, the reducer and each analysis's own coordinates.
IDENTITY_COLUMNS = ("model", "data", "num_images", "reducer_spec", "mask_count", "mask_fraction", "placement", "fill",
                    "seed", "layer", "top_p", "locality", "retok", "stem")


def latest(df: pd.DataFrame, qualifiers: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per measurement, the last written (a --force rerun appends a newer row of a key).

    Rows are the same measurement when their config_key is; a CSV without keys falls back to the
    identity columns it has (plus `qualifiers`, the settings of an analysis such as its features).
    """
    if "config_key" in df.columns and df["config_key"].notna().all():
        keys = ["config_key"]
    else:
        keys = [k for k in (*IDENTITY_COLUMNS, *qualifiers) if k in df.columns]
    if not keys:
        return df.reset_index(drop=True)
    return df.drop_duplicates(subset=keys, keep="last").reset_index(drop=True)


def config_key(d: dict[str, Any]) -> str:
    """Short stable hash of a configuration, for skipping rows that are already in a CSV."""
    canonical = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(canonical.encode()).hexdigest()[:12]


def existing_keys(path: str | os.PathLike) -> set[str]:
    """config_key of every row already in a result CSV (what a rerun skips)."""
    return set(rows_by_key(path))


def rows_by_key(path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """The last row of each config_key in a result CSV (a --force rerun appends a newer one).

    Only well-formed rows with a non-empty config_key count: a damaged row is not a finished one."""
    header, good, _ = well_formed(Path(path))
    if header is None:
        return {}
    rows = (dict(zip(header, fields)) for fields in good)
    return {row["config_key"]: row for row in rows if row.get("config_key")}


def last_rows(path: str | os.PathLike, keys: list[str]) -> list[dict[str, str]]:
    """The last row of each key, in the order of `keys` (keys without a row are left out)."""
    by_key = rows_by_key(path)
    return [by_key[k] for k in keys if k in by_key]


REFERENCE_MARKER = ".ipbench-reference"  # a folder of committed reference results holds this file
WRITE_REFERENCE_ENV = "IPBENCH_WRITE_REFERENCE"  # =1: the maintainers' way to regenerate one


def is_reference(folder: str | os.PathLike) -> bool:
    """Whether `folder` (or a folder above it) holds committed reference results."""
    path = Path(folder).resolve()
    return any((p / REFERENCE_MARKER).exists() for p in (path, *path.parents))


def prepare_out(folder: str | os.PathLike, option: str = "--out") -> Path:
    """Create the output folder and check that it can be written, BEFORE anything is measured.

    A path that is a file, lies under a file, or cannot be written is a one-line UserError; so is a
    folder of committed reference results (unless IPBENCH_WRITE_REFERENCE=1).
    """
    path = Path(folder)
    if is_reference(path) and os.environ.get(WRITE_REFERENCE_ENV, "") != "1":
        raise UserError(f"{option} {path}: this folder holds committed reference results ({REFERENCE_MARKER}); "
                        f"write to another folder (or set {WRITE_REFERENCE_ENV}=1 to regenerate it)")
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path}: is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserError(f"{option} {path}: cannot write there ({reason})") from None
    return path
