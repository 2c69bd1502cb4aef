"""The typer application and the one error policy of every command.

A UserError is one stderr line ``error: ...`` and exit code 2; Ctrl-C is exit code 130 with the
rows written so far kept. Nothing else is caught: a bug shows its traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from ipbench.errors import UserError

app = typer.Typer(
    name="ipbench",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(fn: F) -> F:
    """Turn UserError into one stderr line + exit 2, and Ctrl-C into exit 130 (rows are kept)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; rows written so far are kept", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def _root() -> None:
    """Measure what token reduction does to timm Vision Transformers: accuracy, GMACs, throughput.

    Weights: --checkpoint FILE or IPBENCH_CHECKPOINT (else timm's hub download; --weights random for
    timm's initialisation). Data: --data PATH or IPBENCH_DATA. Results are appended to CSVs under
    --out (default results/).
    """
