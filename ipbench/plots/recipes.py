"""Recipes: one TOML file per paper table or figure, run in-process, paper numbers beside ours.

A recipe holds the paper's table (its rows with their published numbers), the exact ipbench
commands and options that measure the same thing here, and how to read the measured value of
each cell from the CSVs those commands write. Keeping all three in one file is what makes a
reproduction reviewable: the numbers, the commands and the mapping can be checked side by side.

Format (see recipes/*.toml)::

    title = "Table 4: ..."          # required
    paper = "ImagePiece (AAAI 2025), Table 4"
    setting = "what the paper measured: model, training, data, hardware"
    note = "what differs here"

    [defaults]                      # options for every step that has them; --model etc. override
    model = "deit_s"

    [[steps]]                       # required, run in order: `ipbench <command> --key value ...`
    command = "robustness"
    args = { masks = "7,10,15,20,25,50", reducers = "evit:keep=0.7,tome:r=13" }

    [compare]                       # or [[compare]] for several tables
    csv = "robustness.csv"          # in the output folder
    key = "reducer_spec"            # CSV column matched against each row's `reducer` (canonical specs)
    columns = [{ name = "7 masks", value = "top1", where = { mask_count = 7 } }, ...]
    extra = [{ name = "GMACs", value = "gmacs" }]      # measured only, no paper number

    [[compare.rows]]
    label = "ToMe"
    model = "deit_s"                # the paper row's model (optional)
    reducer = "tome:r=13"           # measured with this spec; leave out when ipbench cannot run it
    paper = [78.41, 77.73, ...]     # one per column; "" where the paper gives none
    note = "..."
    where = { locality = 2 }        # optional: conditions for all of the row's cells
    nearest = { speedup_median = 2.49 }   # optional: the CSV row closest to this value

`where` values match numbers numerically (a percentage such as top_p = 30 also matches a column
stored as fractions, 0.3); "first" / "last" pick the smallest / largest value of that column among
the matching rows (e.g. the first merging block). `nearest = { col = x }` picks the matching row
whose `col` is closest to x. Reducer specs are compared in canonical form (`ipbench reducers`), so
"evit:keep=0.7" matches the full spec a CSV records.
"""

from __future__ import annotations

import math
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ipbench.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]

OVERRIDES = ("model", "checkpoint", "data", "limit", "out")
STEP_KEYS = {"command", "args"}
TOP_KEYS = {"title", "paper", "setting", "note", "defaults", "steps", "compare"}


@dataclass
class Column:
    name: str
    value: str  # CSV column holding the measured number
    where: dict[str, Any] = field(default_factory=dict)
    nearest: dict[str, float] = field(default_factory=dict)
    digits: int = 2
    percent: bool = False  # shares stored as fractions are shown ×100


@dataclass
class Row:
    label: str
    paper: list[float | None]
    reducer: str | None = None
    model: str | None = None
    note: str = ""
    where: dict[str, Any] = field(default_factory=dict)  # added to every column's conditions
    nearest: dict[str, float] = field(default_factory=dict)


@dataclass
class Compare:
    csv: str
    key: str
    columns: list[Column]
    rows: list[Row]
    extra: list[Column] = field(default_factory=list)
    title: str = ""


@dataclass
class Step:
    command: str
    args: dict[str, Any]


@dataclass
class Recipe:
    path: Path
    title: str
    steps: list[Step]
    compares: list[Compare]
    defaults: dict[str, Any] = field(default_factory=dict)
    paper: str = ""
    setting: str = ""
    note: str = ""


# -- loading ------------------------------------------------------------------------------------

def _need(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise UserError(f"{where}: missing '{key}'")
    if not isinstance(d[key], kind):
        raise UserError(f"{where}: '{key}' must be {getattr(kind, '__name__', 'a value')}")
    return d[key]


def _column(c: Any, where: str) -> Column:
    if not isinstance(c, dict):
        raise UserError(f"{where}: each column is a table like {{ name = '...', value = 'top1' }}")
    unknown = set(c) - {"name", "value", "where", "nearest", "digits", "percent"}
    if unknown:
        raise UserError(f"{where}: unknown column field(s) {', '.join(sorted(unknown))}")
    return Column(name=str(_need(c, "name", (str, int, float), where)), value=_need(c, "value", str, where),
                  where=dict(c.get("where", {})), nearest=dict(c.get("nearest", {})),
                  digits=int(c.get("digits", 2)), percent=bool(c.get("percent", False)))


def _compare(c: Any, where: str) -> Compare:
    if not isinstance(c, dict):
        raise UserError(f"{where}: must be a table")
    columns = [_column(x, f"{where}.columns") for x in _need(c, "columns", list, where)]
    extra = [_column(x, f"{where}.extra") for x in c.get("extra", [])]
    rows = []
    for i, r in enumerate(_need(c, "rows", list, where), 1):
        w = f"{where}.rows[{i}]"
        if not isinstance(r, dict):
            raise UserError(f"{w}: must be a table")
        paper = list(r.get("paper", []))
        if len(paper) > len(columns):
            raise UserError(f"{w}: {len(paper)} paper numbers for {len(columns)} columns")
        vals: list[float | None] = []
        for v in paper + [""] * (len(columns) - len(paper)):
            if isinstance(v, bool) or not isinstance(v, int | float | str) or (isinstance(v, str) and v != ""):
                raise UserError(f"{w}: paper numbers must be numbers (or \"\" where the paper gives none)")
            vals.append(None if v == "" else float(v))
        unknown = set(r) - {"label", "paper", "reducer", "model", "note", "where", "nearest"}
        if unknown:
            raise UserError(f"{w}: unknown field(s) {', '.join(sorted(unknown))}")
        rows.append(Row(label=str(_need(r, "label", str, w)), paper=vals, reducer=r.get("reducer"),
                        model=r.get("model"), note=str(r.get("note", "")), where=dict(r.get("where", {})),
                        nearest=dict(r.get("nearest", {}))))
    return Compare(csv=_need(c, "csv", str, where), key=str(c.get("key", "reducer_spec")), columns=columns,
                   rows=rows, extra=extra, title=str(c.get("title", "")))


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Parse and check a recipe file; every problem is a one-line UserError naming the file."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{file}: no such recipe file (the recipes are in recipes/*.toml)")
    if tomllib is None:  # pragma: no cover - Python 3.10 without tomli
        raise UserError("reading recipes on Python 3.10 needs the 'tomli' package: pip install tomli")
    try:
        doc = tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{file}: not valid TOML ({' '.join(str(exc).split())})") from None
    name = file.name
    if "finetune" in doc:
        raise UserError(f"{name} is a fine-tune recipe: run it with `ipbench finetune --config {file}`")
    unknown = set(doc) - TOP_KEYS
    if unknown:
        raise UserError(f"{name}: unknown key(s) {', '.join(sorted(unknown))} "
                        f"(a recipe has {', '.join(sorted(TOP_KEYS))})")
    title = _need(doc, "title", str, name)
    steps = []
    raw_steps = _need(doc, "steps", list, name)
    if not raw_steps:
        raise UserError(f"{name}: 'steps' is empty: a recipe runs at least one command")
    for i, s in enumerate(raw_steps, 1):
        w = f"{name}: steps[{i}]"
        if not isinstance(s, dict):
            raise UserError(f"{w}: must be a table with 'command' and 'args'")
        unknown = set(s) - STEP_KEYS
        if unknown:
            raise UserError(f"{w}: unknown key(s) {', '.join(sorted(unknown))} (a step has command and args)")
        args = s.get("args", {})
        if not isinstance(args, dict):
            raise UserError(f"{w}: 'args' must be a table of option = value")
        steps.append(Step(command=_need(s, "command", str, w), args=dict(args)))
    raw = doc.get("compare", [])
    raw = [raw] if isinstance(raw, dict) else raw
    compares = [_compare(c, f"{name}: compare") for c in raw]
    defaults = doc.get("defaults", {})
    if not isinstance(defaults, dict):
        raise UserError(f"{name}: 'defaults' must be a table of option = value")
    return Recipe(path=file, title=title, steps=steps, compares=compares, defaults=dict(defaults),
                  paper=str(doc.get("paper", "")), setting=str(doc.get("setting", "")), note=str(doc.get("note", "")))


# -- comparing ----------------------------------------------------------------------------------

Canon = Callable[[str], str]  # a spec as written -> its canonical form (the command line passes the parser's)


def _canon(spec: str, cache: dict[str, str], canon: Canon | None = None) -> str:
    if spec not in cache:
        try:
            cache[spec] = (canon or str.strip)(spec)
        except Exception:  # a spec this ipbench cannot parse only matches itself
            cache[spec] = spec.strip()
    return cache[spec]


def _matches(series: pd.Series, want: Any) -> pd.Series:
    import pandas as pd

    num = pd.to_numeric(series, errors="coerce")
    if isinstance(want, int | float) and not isinstance(want, bool):
        return (num - float(want)).abs() <= 1e-9 * max(1.0, abs(float(want)))
    return series.astype(str).str.strip().str.lower() == str(want).strip().lower()


def measured_value(df: pd.DataFrame, key: str, row: Row, col: Column, cache: dict[str, str],
                   canon: Canon | None = None) -> float | None:
    """The number for one cell: the last CSV row of the row's reducer that meets the conditions."""
    import pandas as pd

    if key not in df.columns or col.value not in df.columns or row.reducer is None:
        return None
    want = _canon(row.reducer, cache, canon)
    rows = df[df[key].astype(str).map(lambda s: _canon(s, cache, canon)) == want]
    for c, v in {**row.where, **col.where}.items():
        if c not in rows.columns:
            return None
        if isinstance(v, str) and v in ("first", "last"):
            nums = pd.to_numeric(rows[c], errors="coerce")
            if nums.notna().any():
                rows = rows[nums == (nums.min() if v == "first" else nums.max())]
            continue
        hit = _matches(rows[c], v)
        nums = pd.to_numeric(rows[c], errors="coerce")
        if not hit.any() and isinstance(v, int | float) and v > 1 and nums.notna().any() and nums.max() <= 1:
            hit = _matches(rows[c], v / 100)  # a percentage against a column stored as fractions
        rows = rows[hit]
    vals = pd.to_numeric(rows[col.value], errors="coerce")
    rows = rows[vals.notna()]
    if rows.empty:
        return None
    for c, target in {**row.nearest, **col.nearest}.items():
        if c in rows.columns:
            dist = (pd.to_numeric(rows[c], errors="coerce") - float(target)).abs()
            rows = rows.loc[[dist.idxmin()]] if dist.notna().any() else rows
    value = float(pd.to_numeric(rows[col.value], errors="coerce").iloc[-1])
    if col.percent and abs(value) <= 1.0:
        value *= 100
    return value


@dataclass
class Comparison:
    """A filled-in comparison: header lines, column names and the cells as text."""

    title: str
    header: list[str]
    columns: list[str]
    cells: list[list[str]]
    footnotes: list[str]


def _fmt(v: float | None, digits: int) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def compare(recipe: Recipe, cmp: Compare, folder: Path, run_model: str | None, canon: Canon | None = None,
            label: Callable[[str], str] | None = None, resolve_name: Callable[[str], str] | None = None
            ) -> Comparison:
    """Paper numbers beside the measured ones for one compare block of a recipe.

    `canon` puts a reducer spec in canonical form, `label` shortens it for the "measured as" column
    and `resolve_name` turns a model alias into its timm name (the command line passes the engine's
    functions; this module never imports it).
    """
    from ipbench.plots.frames import data_name, hardware_summary, training_note
    from ipbench.results import read_rows

    resolve_name = resolve_name or str
    label = label or str
    path = folder / cmp.csv
    try:
        df = read_rows(path)
    except Exception as exc:  # noqa: BLE001 - a broken CSV is reported, not raised
        raise UserError(f"{path}: unreadable ({' '.join(str(exc).split())[:120]})") from None
    model = resolve_name(run_model) if run_model else None
    if model and "model" in df.columns:
        df = df[df["model"].astype(str) == model]
    footnotes: list[str] = []
    if df.empty:
        footnotes.append(f"no measured rows for {model or 'this model'} in {path}")
    same = [r for r in cmp.rows if r.model and model and resolve_name(r.model) == model]
    cache: dict[str, str] = {}
    columns = ["paper row"]
    for c in cmp.columns:
        columns += [f"{c.name} (paper)", f"{c.name} (here)"]
    columns += [c.name + " (here)" for c in cmp.extra] + ["measured as"]
    cells = []
    for row in cmp.rows:
        show = row.reducer is not None and (not same or row in same)
        line = [row.label + (f" [{row.model}]" if row.model else "")]
        for c, p in zip(cmp.columns, row.paper):
            m = measured_value(df, cmp.key, row, c, cache, canon) if show and not df.empty else None
            line += [_fmt(p, c.digits), _fmt(m, c.digits)]
        for c in cmp.extra:
            m = measured_value(df, cmp.key, row, c, cache, canon) if show and not df.empty else None
            line.append(_fmt(m, c.digits))
        measured_as = label(_canon(row.reducer, cache, canon)) if show and row.reducer else ""
        if show and (row.where or row.nearest):
            conds = [f"{k}={v}" for k, v in row.where.items()] + [f"{k}≈{v}" for k, v in row.nearest.items()]
            measured_as += f" ({', '.join(conds)})"
        line.append(measured_as if show else ("(not run: another model)" if row.reducer else "(not in ipbench)"))
        cells.append(line)
        if row.note:
            footnotes.append(f"{row.label}: {row.note}")
    if not same and model and any(r.model for r in cmp.rows):
        papers = ", ".join(dict.fromkeys(r.model for r in cmp.rows if r.model))
        footnotes.append(f"the paper's rows are for {papers}; measured on {model}")
    header = []
    if recipe.setting:
        header.append(f"paper: {recipe.setting}")
    if not df.empty:
        datas = ", ".join(dict.fromkeys(data_name(str(d)) for d in df.get("data", [])))
        images = "/".join(str(int(float(n))) for n in dict.fromkeys(df.get("num_images", [])) if str(n) != "")
        hw = hardware_summary(df)
        header.append(f"here: {model or ', '.join(map(str, df.get('model', [])))} · {datas} · {images} images"
                      f"{' · ' + hw if hw else ''} · "
                      f"{'training-free (off-the-shelf weights)' if training_note(df) else 'weights fine-tuned here'}")
    return Comparison(title=cmp.title or recipe.title, header=header, columns=columns, cells=cells,
                      footnotes=footnotes)


def comparison_markdown(recipe: Recipe, comps: list[Comparison], argvs: list[list[str]]) -> str:
    """The comparison as markdown, with the commands that produced it."""
    import pandas as pd

    from ipbench.plots.report import markdown_table

    lines = [f"# {recipe.title}", ""]
    if recipe.paper:
        lines += [f"Source: {recipe.paper}", ""]
    if recipe.note:
        lines += [recipe.note, ""]
    lines += ["Commands:", "", "```sh", *(f"ipbench {shlex.join(a)}" for a in argvs), "```", ""]
    for comp in comps:
        lines += [f"## {comp.title}", "", *(f"- {h}" for h in comp.header), ""]
        lines += [markdown_table(pd.DataFrame(comp.cells, columns=comp.columns)), ""]
        lines += [f"- {n}" for n in comp.footnotes] + ([""] if comp.footnotes else [])
    return "\n".join(lines)
