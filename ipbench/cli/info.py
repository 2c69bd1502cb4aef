"""What is available: the model aliases and the registered reducers with their parameters."""

from __future__ import annotations

from typing import Annotated

import typer

from ipbench.cli.app import app, handle_errors
from ipbench.errors import UserError


@app.command("models")
@handle_errors
def models_cmd(
    timm_pattern: Annotated[str | None, typer.Option(
        "--timm", help="Also list timm model names matching this pattern, e.g. '*vit*' or 'deit*'.")] = None,
) -> None:
    """List the model aliases; any timm model name is accepted as well (reducers need a ViT)."""
    from rich.console import Console
    from rich.table import Table

    from ipbench.models import ALIASES

    table = Table(title="model aliases")
    table.add_column("alias")
    table.add_column("timm name")
    for alias, name in ALIASES.items():
        table.add_row(alias, name)
    console = Console()
    console.print(table)
    console.print("Any timm ViT name works as well: ipbench models --timm '*vit*'")
    if timm_pattern:
        import timm

        names = timm.list_models(timm_pattern)
        if not names:
            raise UserError(f"no timm model matches {timm_pattern!r}")
        console.print("\n".join(names), soft_wrap=True)


@app.command("reducers")
@handle_errors
def reducers_cmd(
    name: Annotated[str | None, typer.Option(
        "--name", help="Show only this reducer (e.g. imagepiece).")] = None,
    plain: Annotated[bool, typer.Option(
        "--plain", help="Tidy text (one 'reducer param=default: help' line each) instead of a table.")] = False,
) -> None:
    """The registered token reducers: parameters, defaults and what each one does.

    A spec names a reducer and sets parameters: 'evit:keep=0.7,fuse=false', 'tome:r=13',
    combinations 'imagepiece+tome'.
    """
    from rich.console import Console
    from rich.table import Table

    from ipbench.reducers import list_reducers
    from ipbench.reducers.policy import format_value

    classes = list_reducers()
    if name is not None:
        classes = [c for c in classes if c.name == name.strip().lower()]
        if not classes:
            raise UserError(f"unknown reducer {name!r}; valid: {', '.join(sorted(c.name for c in list_reducers()))}")
    if plain:
        for cls in classes:
            typer.echo(f"{cls.name}: {cls.description}")
            for p in cls.PARAMS:
                typer.echo(f"  {p.describe()}")
        return
    table = Table(title="token reducers (spec: name:param=value,...; combine with +)", show_lines=True)
    table.add_column("reducer", no_wrap=True)
    table.add_column("parameter", no_wrap=True)
    table.add_column("default", overflow="fold")
    table.add_column("what it does", overflow="fold")
    for cls in classes:
        knob = f" [sweep sets {cls.knob.param}]" if cls.knob is not None else ""
        table.add_row(f"[bold]{cls.name}[/]", "", "", cls.description + knob)
        for p in cls.PARAMS:
            choices = f" ({'|'.join(p.choices)})" if p.choices else ""
            table.add_row("", p.name, format_value(p.default), p.help + choices)
    Console().print(table)
