"""Everything a command draws: the one progress display (runs report to it), consoles and tables.

Progress goes to stderr and disappears when done (the table that follows carries the numbers);
a log file (no terminal) gets no bars, only the lines a run writes (each row as it is written,
warnings), so an error stays the one line it is.
"""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from ipbench.cli.app import main_rank


class _Rate(ProgressColumn):
    """Steps per second of the current phase (images/s while images are processed)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f}/s" if speed else "", style="progress.data.speed")


class Display:
    """The runs' Progress, drawn with rich: rows done (when a command writes several), and the phase."""

    def __init__(self, total_rows: int | None = None, what: str = "") -> None:
        self.progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            _Rate(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True, quiet=not main_rank()),
            transient=True,
        )
        self.overall = (self.progress.add_task(f"{what}: rows", total=total_rows, detail="")
                        if total_rows is not None else None)
        self.current = self.progress.add_task("", total=None, detail="", visible=False)

    def __enter__(self) -> Display:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def phase(self, description: str, total: int | None) -> None:
        self.progress.reset(self.current, total=total, description=description, detail="", visible=True)

    def advance(self, n: int = 1, detail: str | None = None) -> None:
        self.progress.advance(self.current, n)
        if detail is not None:
            self.progress.update(self.current, detail=detail)

    def set_done(self, done: int, total: int, detail: str) -> None:
        self.progress.update(self.current, completed=done, total=total, detail=detail)

    def row_written(self, message: str) -> None:
        if self.overall is not None:
            self.progress.advance(self.overall)
        self.progress.console.print(message, soft_wrap=True, highlight=False)

    def log(self, message: str) -> None:
        self.progress.console.print(message, soft_wrap=True, highlight=False)


def wide_console() -> Console:
    """stdout console; captured output (a log file, nohup) gets room for a whole table row."""
    console = Console()
    return console if console.is_terminal else Console(width=200)


def paper_console() -> Console:
    """stdout, at least 140 columns wide: the paper-shaped tables must not fold their numbers."""
    c = Console()
    return Console(width=max(140, c.width)) if c.width < 140 else c


def paper_table(title: str, columns: list[str], caption: str | None = None) -> Table:
    """A rich table: the first column left-aligned (labels), the others right-aligned (numbers)."""
    t = Table(title=title, caption=caption, box=box.SIMPLE_HEAVY, caption_justify="left")
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i == 0 else "right", overflow="fold", no_wrap=i == 0)
    return t


def label(row: dict[str, Any]) -> str:
    """The short label a run wrote into the row (the full spec for rows of an older ipbench)."""
    return str(row.get("reducer_label") or row.get("reducer_spec") or row.get("reducer", ""))


def _num(value: Any, fmt: str) -> str:
    if value in ("", None):
        return "–"
    try:
        return format(float(value), fmt)
    except ValueError:
        return str(value)


def _spread(row: dict[str, Any], stem: str, fmt: str, range_fmt: str) -> str:
    """``median (min–max)``: a timing is never one number."""
    med = row.get(f"{stem}_median", "")
    if med in ("", None):
        return "–"
    return f"{_num(med, fmt)} ({_num(row[f'{stem}_min'], range_fmt)}–{_num(row[f'{stem}_max'], range_fmt)})"


def _any(rows: list[dict[str, Any]], column: str) -> bool:
    return any(row.get(column) not in ("", None) for row in rows)


def rows_table(rows: list[dict[str, Any]], title: str, caption: str | None = None,
               columns: tuple[str, ...] = ("keep", "tokens", "gmacs", "top1", "speed")) -> Table:
    """A table of result rows (CSV rows or the dicts written): the numbers a user compares.

    Groups: batch (shown when the rows have several), keep (keep rate, budget), tokens, gmacs (fvcore),
    analytic, top1, speed, latency (with peak memory and the attention kernel). Columns
    whose values are all empty (no budget, accuracy skipped, --no-speed) are left out; the CSV
    holds everything else (top-5, exact counts, tokens per layer).
    """
    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD)
    table.add_column("reducer", overflow="fold", min_width=14)
    cells: list[list[str]] = [[label(row)] for row in rows]

    def add(head: str, values: list[str]) -> None:
        # a median and its range may wrap onto two lines in a narrow terminal; nothing else wraps
        table.add_column(head, justify="right", no_wrap="(" not in head)
        for row_cells, value in zip(cells, values):
            row_cells.append(value)

    if "batch" in columns and len({str(r.get("batch_size")) for r in rows}) > 1:
        add("batch", [str(r.get("batch_size", "")) for r in rows])
    if "keep" in columns and _any(rows, "keep_rate"):
        add("keep", [_num(r.get("keep_rate"), "g") for r in rows])
    if "keep" in columns and _any(rows, "gmacs_budget"):
        add("budget", [_num(r.get("gmacs_budget"), "g") for r in rows])
    if "tokens" in columns:
        add("tokens", [str(r.get("final_tokens", "")) for r in rows])
    if "gmacs" in columns:
        add("GMACs", [_num(r.get("gmacs"), ".3f") for r in rows])
    if "analytic" in columns:
        add("analytic" if "gmacs" in columns else "GMACs", [_num(r.get("gmacs_analytic"), ".3f") for r in rows])
    if "gmacs" in columns or "analytic" in columns:
        add("ratio", [_num(r.get("gmacs_ratio"), ".2f") for r in rows])
    if "top1" in columns and _any(rows, "top1"):
        if _any(rows, "top1_low"):
            from ipbench.plots.frames import interval_cell

            add("top-1 % [95 % CI]", [interval_cell(r, digits=1) for r in rows])
        else:
            add("top-1 %", [_num(r.get("top1"), ".1f") for r in rows])
    if "speed" in columns and _any(rows, "img_s_median"):
        add("img/s (min–max)", [_spread(r, "img_s", ".1f", ".0f") for r in rows])
        add("speed-up (min–max)", [_spread(r, "speedup", ".2f", ".2f") for r in rows])
    if "latency" in columns and _any(rows, "latency_ms_median"):
        add("latency ms (p90)", [f"{_num(r.get('latency_ms_median'), '.1f')} ({_num(r.get('latency_ms_p90'), '.1f')})"
                                 for r in rows])
        add("peak MiB", [_num(r.get("peak_mem_mib"), ".1f") for r in rows])
        add("attention", [str(r.get("attention_backend", "")) for r in rows])
    for row_cells in cells:
        table.add_row(*row_cells)
    return table


def print_comparisons(pairs: list[Any], title: str, compact: bool = False) -> None:
    """The comparison table (plots.compare.shown_rows) and the line on what these images resolve."""
    from ipbench.plots.compare import resolvable, shown_rows

    shown = shown_rows(pairs, compact)
    t = paper_table(title, list(shown[0]),
                    "CI of a top-1: Wilson; of a difference: paired bootstrap over images (2000 resamples); "
                    "McNemar: exact, two-sided, on the discordant images; not significant at p >= 0.05.")
    for cells in shown:
        t.add_row(*(str(v) for v in cells.values()))
    paper_console().print(t)
    low, high = resolvable(pairs)
    paper_console().print(f"resolvable with these images (80 % power, McNemar at 0.05): differences of {low:.1f} "
                          f"to {high:.1f} points, depending on how often the two rows disagree", soft_wrap=True)


def sensitivity_table(rows: list[dict[str, Any]], title: str, caption: str | None = None) -> Table:
    """`ipbench sensitivity`'s rows: per variant (patch size, resolution, grid) each reducer's tokens,
    GMACs, ratio to that variant's baseline, top-1 with its interval (and speed-up when timed)."""
    from ipbench.plots.frames import interval_cell

    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD)
    timed = _any(rows, "speedup_median")
    for head in ("varies", "patch", "px", "grid", "reducer", "tokens", "GMACs", "ratio", "top-1 % [95 % CI]",
                 *(("speed-up",) if timed else ())):
        table.add_column(head, justify="left" if head in ("varies", "reducer") else "right", no_wrap=True)
    last = None
    for r in rows:
        variant = (r["axis"], r["patch_size"], r["img_size"])
        first = variant != last
        if first and last is not None:
            table.add_section()
        last = variant
        cells = [str(r["axis"]) if first else "", str(r["patch_size"]) if first else "",
                 str(r["img_size"]) if first else "", f"{r['grid']}x{r['grid']}" if first else "", label(r),
                 str(r.get("final_tokens", "")), _num(r.get("gmacs"), ".3f"), _num(r.get("gmacs_ratio"), ".2f"),
                 interval_cell(r, digits=1) if r.get("top1_low") not in ("", None) else _num(r.get("top1"), ".1f")]
        if timed:
            cells.append(_num(r.get("speedup_median"), ".2f"))
        table.add_row(*cells)
    return table
