"""Result CSVs: fixed schemas, whole-row appends that survive a crash, and resume by config key.

Every command appends to ``<out>/<command>.csv``. A row is written in one ``write`` followed by
flush + fsync, so an interrupted run normally leaves complete rows only and can resume where it stopped.

The file layer (well-formed rows, damaged tails, the writers' lock) is `ipbench.csvfile`.
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
    append_row,
    as_text,
    check_file,
    check_header,
    damaged_path,
    repair_tail,
    well_formed,
)
from ipbench.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

# Columns of results/eval.csv, in order (documented in the README).
EVAL_COLUMNS: list[str] = [
    "timestamp",
    "config_key",
    "model",
    "checkpoint",
    "checkpoint_sha256",
    "weights",  # checkpoint (a local file) | pretrained (timm's hub weights) | random (timm's initialisation)
    "data",
    "num_images",
    "skipped_images",
    "reducer",
    "reducer_params",
    "reducer_label",  # the short label tables and plots show (knob and parameters off their defaults)
    "training_free",
    "tokens_per_layer",
    "final_tokens",
    "top1",
    "top5",
    "correct1",
    "correct5",
    "device",
    "device_name",
    "dtype",  # the precision the model computed in: amp_dtype under autocast, else model_dtype
    "amp_dtype",  # autocast dtype (float32 = no autocast)
    "model_dtype",  # dtype the weights and inputs were cast to
    "batch_size",
    "threads",
    "seed",
    "torch",
    "timm",
    "ipbench",
]


# Columns of results/sweep.csv (also written by `ipbench flops` and `ipbench speed` for their own
# files with the measurements they make; empty where a measurement was not taken).
SWEEP_COLUMNS: list[str] = [
    "timestamp",
    "config_key",
    "model",
    "checkpoint",
    "checkpoint_sha256",
    "weights",
    "data",
    "num_images",
    "reducer",  # reducer name ("none" for the baseline)
    "reducer_spec",  # canonical spec with every parameter
    "reducer_params",  # the same parameters as JSON
    "reducer_label",  # short label: the knob and the parameters off their defaults
    "reducer_line",  # the label without the knob: the line a row belongs to in a figure
    "keep_rate",  # the sweep's nominal keep rate this row stands for (empty for the baseline)
    "gmacs_budget",  # --match-gmacs target, empty otherwise
    "training_free",
    "tokens_per_layer",  # tokens after each block, space separated
    "final_tokens",
    "gmacs",  # fvcore GMACs per image (fused attention counted)
    "gmacs_analytic",  # from the static token plan
    "flop_counter",
    "gmacs_ratio",  # baseline GMACs / this row's GMACs
    "top1",
    "top5",
    "correct1",
    "correct5",
    "img_s_median",
    "img_s_min",
    "img_s_max",
    "speedup_median",  # median of per-round paired ratios against the baseline of the same run
    "speedup_min",
    "speedup_max",
    "batch_size",
    "repeats",
    "min_seconds",
    "device",
    "device_name",
    "dtype",
    "amp_dtype",
    "model_dtype",
    "threads",
    "compile",
    "seed",
    "torch",
    "timm",
    "ipbench",
]


# The analysis CSVs (ipbench.analyses): who/what/which reducer first, then the command's own
# columns, then where and how it ran. `layer` is a 0-indexed block, or "all" for the pooled row.
_ANALYSIS_HEAD: list[str] = [
    "timestamp",
    "config_key",
    "model",
    "checkpoint",
    "checkpoint_sha256",
    "weights",
    "data",
    "num_images",
    "reducer",
    "reducer_spec",
    "reducer_params",
    "reducer_label",
    "reducer_line",
    "training_free",
    "tokens_per_layer",
    "final_tokens",
]
_ANALYSIS_TAIL: list[str] = [
    "device",
    "device_name",
    "dtype",
    "amp_dtype",
    "model_dtype",
    "batch_size",
    "threads",
    "seed",
    "torch",
    "timm",
    "ipbench",
]

# results/robustness.csv: top-1 under random 16x16 masks (paper Table 4), one row per reducer and count.
ROBUSTNESS_COLUMNS: list[str] = [
    *_ANALYSIS_HEAD,
    "mask_count",  # masked squares per image
    "mask_fraction",  # mask_count / patches of the grid
    "placement",  # patch (distinct grid cells) | free (any pixel position, may overlap)
    "fill",  # zero (0 in normalised space) | mean (the image's channel means) | noise (N(0,1), normalised)
    "top1",
    "top5",
    "correct1",
    "correct5",
    *_ANALYSIS_TAIL,
]

# results/similarity.csv: cosine similarity of merged pairs (paper Tables 6, 8), per block and features.
SIMILARITY_COLUMNS: list[str] = [
    *_ANALYSIS_HEAD,
    "layer",
    "features",  # metric (what the reducer matched on) | hidden (hidden states)
    "metric",  # the matching metric's name (keys = head-mean keys, x = hidden states)
    "pairs",  # merged | pruned (imagepiece retok=prune: the pairs that would have merged)
    "mean_cos",
    "std_cos",
    "n_pairs",
    *_ANALYSIS_TAIL,
]

# results/importance.csv: share of merged tokens in the top-p by CLS attention (paper Table 7).
IMPORTANCE_COLUMNS: list[str] = [
    *_ANALYSIS_HEAD,
    "layer",
    "top_p",  # fraction (0.3 = top 30 %)
    "tokens",  # src (tokens merged away) | both (and their destinations)
    "share",  # fraction of the merged tokens inside the top-p set
    "random_share",  # the same for tokens chosen at random (the top set's size / tokens)
    "n_top",  # merged tokens inside the top-p set
    "n_merged",
    *_ANALYSIS_TAIL,
]

# results/attentiveness.csv: inattentive tokens that are attentive in the next block (paper Table 5).
ATTENTIVENESS_COLUMNS: list[str] = [
    *_ANALYSIS_HEAD,
    "layer",  # the re-tokenize block; attentiveness is read again in layer + 1
    "attentive_rate",  # attentive = inside the top attentive_rate fraction by CLS attention
    "population",  # merged (inattentive tokens that took part in a merge) | inattentive (all of them)
    "share_became_attentive",
    "n_became_attentive",
    "n_inattentive",
    *_ANALYSIS_TAIL,
]

# results/coherence.csv: ImagePiece's local-coherence ablation (paper Table 8), one row per variant.
COHERENCE_COLUMNS: list[str] = [
    *_ANALYSIS_HEAD,
    "locality",  # λ of the training-free locality penalty (0 = off)
    "retok",  # merge | prune (the control: same schedule, pairs dropped)
    "stem",  # patch (timm's patch embedding) | conv (the learned local-coherence stem)
    "top1",
    "top5",
    "correct1",
    "correct5",
    "gmacs",  # fvcore (+ SDPA handle) on one image
    "gmacs_analytic",  # from the static token plan (empty for the conv stem)
    "flop_counter",  # fvcore+sdpa, or analytic where torch.jit cannot trace the reducer
    "sim_metric",  # mean cosine of the merged (or pruned) pairs over all blocks, matching metric
    "sim_hidden",  # the same on hidden states
    "sim_metric_first",  # in the first re-tokenize block only (the paper's Table 8 value)
    "sim_hidden_first",
    "n_pairs",
    *_ANALYSIS_TAIL,
]


HASH_COLUMNS = ("config_key", "checkpoint_sha256")


def prepare_csv(out: str | os.PathLike, command: str, columns: list[str]) -> Path:
    """OUT/<command>.csv, once the folder is known to be writable and an existing file to have these
    columns (its damaged tail moved aside: `csvfile.check_file`), before anything is measured."""
    path = prepare_out(out) / f"{command}.csv"
    check_file(path, columns)
    return path


PREDICTIONS = "predictions"  # OUT/predictions/<config_key>.csv.gz: one line per image of a row
PREDICTION_COLUMNS = ["image", "label", "pred1", "pred2", "pred3", "pred4", "pred5", "correct1", "correct5"]


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
