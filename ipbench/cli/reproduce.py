"""`ipbench reproduce`: run a recipe (the commands of one paper table) in this process, and print the
paper's numbers beside ours. Recipes are read and compared by `ipbench.plots.recipes`; turning a
recipe's steps into command lines needs the commands themselves, so it lives here.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer

from ipbench.cli.app import app, handle_errors
from ipbench.cli.options import CheckpointOpt, LimitOpt
from ipbench.errors import UserError

if TYPE_CHECKING:
    from ipbench.plots.recipes import Comparison, Recipe


def _commands() -> dict[str, click.Command]:
    group = typer.main.get_command(app)
    return dict(group.commands)  # type: ignore[attr-defined]


def _options(cmd: click.Command) -> dict[str, click.Parameter]:
    """Option name as a recipe writes it (model, keep_rates, speed) → the click parameter."""
    out: dict[str, click.Parameter] = {}
    for p in cmd.params:
        for opt in p.opts:
            if opt.startswith("--"):
                out[opt[2:].replace("-", "_")] = p
    return out


def _argv_for(key: str, value: Any, param: click.Parameter) -> list[str]:
    flag = next(o for o in param.opts if o.startswith("--"))
    if isinstance(value, bool):
        if value:
            return [flag]
        neg = next((o for o in getattr(param, "secondary_opts", []) if o.startswith("--")), None)
        return [neg] if neg else []
    if isinstance(value, list):
        if getattr(param, "multiple", False):
            return [x for v in value for x in (flag, str(v))]
        value = ",".join(str(v) for v in value)
    if getattr(param, "is_flag", False) and isinstance(value, str):  # --set speed=false
        return _argv_for(key, value.strip().lower() in ("1", "true", "yes", "on"), param)
    return [flag, str(value)]


def build_argv(recipe: Recipe, overrides: dict[str, Any], extra: dict[str, str]) -> list[list[str]]:
    """The argv of every step (without the program name), checked against the commands' options.

    Option values: the step's args, then the recipe's defaults and the user's overrides (the latter
    win), then `extra` (--set); defaults/overrides/extra apply only to steps whose command has
    that option.
    """
    commands = _commands()
    argvs = []
    for i, step in enumerate(recipe.steps, 1):
        where = f"{recipe.path.name}: step {i} ({step.command})"
        cmd = commands.get(step.command)
        if cmd is None:
            raise UserError(f"{where}: this ipbench has no command '{step.command}' "
                            f"(commands: {', '.join(sorted(commands))})")
        opts = _options(cmd)
        values: dict[str, Any] = {}
        for key, value in step.args.items():
            k = key.replace("-", "_")
            if k not in opts:
                raise UserError(f"{where}: '{step.command}' has no option --{k.replace('_', '-')} "
                                f"(options: {', '.join('--' + o.replace('_', '-') for o in sorted(opts))})")
            values[k] = value
        for source in (recipe.defaults, overrides, extra):
            for key, value in source.items():
                k = key.replace("-", "_")
                if value is not None and k in opts:
                    values[k] = value
        argv = [step.command]
        for k, v in values.items():
            argv += _argv_for(k, v, opts[k])
        argvs.append(argv)
    unused = [k for k in extra if not any(k.replace("-", "_") in _options(commands[s.command]) for s in recipe.steps)]
    if unused:
        raise UserError(f"--set {unused[0]}: no step of {recipe.path.name} has the option "
                        f"--{unused[0].replace('_', '-')}")
    return argvs


def run_step(argv: list[str]) -> None:
    """Run one ipbench command in this process; a failure stops the recipe (exit code 2)."""
    import click

    cmd = _commands()[argv[0]]
    try:
        code = cmd.main(args=argv[1:], prog_name=f"ipbench {argv[0]}", standalone_mode=False)
    except click.ClickException as exc:
        raise UserError(f"ipbench {argv[0]}: {exc.format_message()}") from None
    except click.exceptions.Abort:
        raise KeyboardInterrupt from None
    if isinstance(code, int) and code != 0:
        if code == 130:
            raise KeyboardInterrupt
        raise UserError(f"step failed (exit code {code}): ipbench {shlex.join(argv)}")


def print_comparison(comp: Comparison, echo: Callable[[Any], None]) -> None:
    """A rich table of one comparison."""
    from rich.table import Table

    table = Table(title=comp.title, caption="\n".join(comp.header + comp.footnotes) or None,
                  caption_justify="left")
    for i, c in enumerate(comp.columns):
        table.add_column(c, justify="left" if i in (0, len(comp.columns) - 1) else "right",
                         style="bold" if c.endswith("(here)") else None, overflow="fold")
    for row in comp.cells:
        table.add_row(*row)
    echo(table)


@app.command("reproduce")
@handle_errors
def reproduce_cmd(
    recipe: Annotated[Path, typer.Argument(help="Recipe file: one paper table or figure, e.g. recipes/table4.toml.")],
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Model for every step (default: the recipe's, usually the paper's).")] = None,
    checkpoint: CheckpointOpt = None,
    data: Annotated[str | None, typer.Option(
        "--data", envvar="IPBENCH_DATA", show_envvar=True,
        help="Data for every step: an ImageNet-style folder, a file,label CSV, or 'synthetic'.")] = None,
    limit: LimitOpt = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Folder for the CSVs, figures and comparison (default: results/<recipe name>).")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="KEY=VALUE: one more option for every step that has it, e.g. --set repeats=1 "
                      "--set min_seconds=0.2 (repeatable).")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the commands the recipe would run, and run nothing.")] = False,
    compare_only: Annotated[bool, typer.Option(
        "--compare-only", help="Run nothing: compare the CSVs already in --out with the paper.")] = False,
    plot: Annotated[bool, typer.Option(
        "--plot/--no-plot", help="Also write the figures and REPORT.md of the output folder.")] = True,
) -> None:
    """Run a recipe (the commands of one paper table) and print the paper's numbers beside ours.

    The commands run in this process, in order; a failing step stops the recipe. The comparison
    is also written to OUT/<recipe name>.md.
    """
    from rich.console import Console

    from ipbench.models import resolve_name
    from ipbench.plots.recipes import compare, comparison_markdown, load_recipe
    from ipbench.reducers import parse_spec, short_label
    from ipbench.results import prepare_out

    spec = load_recipe(recipe)
    extra: dict[str, str] = {}
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set repeats=1")
        extra[key.strip()] = value.strip()
    folder = out or Path("results") / recipe.stem
    overrides = {"model": model, "checkpoint": checkpoint, "data": data, "limit": limit, "out": str(folder)}
    argvs = build_argv(spec, overrides, extra)
    console = Console()
    console = console if console.is_terminal else Console(width=200)  # logs get whole table rows
    console.print(f"[bold]{spec.title}[/]" + (f"\n{spec.paper}" if spec.paper else ""), soft_wrap=True)
    if dry_run or compare_only:
        for argv in argvs:
            console.print(f"ipbench {shlex.join(argv)}", soft_wrap=True, highlight=False)
        if dry_run:
            return
    else:
        prepare_out(folder)
        for i, argv in enumerate(argvs, 1):
            console.print(f"[bold][{i}/{len(argvs)}][/] ipbench {shlex.join(argv)}", soft_wrap=True, highlight=False)
            run_step(argv)
    run_model = resolve_name(model or spec.defaults.get("model") or "deit_t")
    comps = [compare(spec, c, folder, run_model, canon=lambda s: parse_spec(s).spec, label=short_label,
                     resolve_name=resolve_name) for c in spec.compares]
    for comp in comps:
        print_comparison(comp, console.print)
    prepare_out(folder)
    md = folder / f"{recipe.stem}.md"
    md.write_text(comparison_markdown(spec, comps, argvs), encoding="utf-8")
    console.print(f"comparison: {md}", soft_wrap=True)
    if plot:
        from ipbench.plots import plot_folder, write_report

        console.print(f"report: {write_report(folder, plot_folder(folder), command='plot')}", soft_wrap=True)
