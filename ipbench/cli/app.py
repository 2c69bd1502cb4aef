"""The typer application and the one error policy of every command.

A UserError is one stderr line ``error: ...`` and exit code 2; Ctrl-C is exit code 130 with the
rows written so far kept. Nothing else is caught: a bug shows its traceback.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import typer
from typer.core import TyperGroup

from ipbench.errors import UserError

# typer >= 0.17 carries its own copy of click: its exceptions, wherever they live in this release
_click_errors = sys.modules[typer.BadParameter.__module__]


def main_rank() -> bool:
    """Whether this process prints: always, except a torchrun rank other than 0 (rank 0 speaks for all)."""
    return os.environ.get("RANK", "0") in ("0", "")


class _OneLineErrors(TyperGroup):
    """Bad command-line values, typer's and click's own range and choice checks included, are one
    stderr line ``error: ...`` with exit code 2, like every other bad input (not a box of 5 lines)."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except _click_errors.NoArgsIsHelpError as exc:  # bare `ipbench`: the help, as before
            exc.show()
            sys.exit(exc.exit_code)
        except _click_errors.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "ipbench"
            if main_rank():
                text = " ".join(exc.format_message().split()).replace("Value error, ", "")
                typer.echo(f"error: {text} (see {where} --help)", err=True)
            sys.exit(2)
        except _click_errors.ClickException as exc:
            if main_rank():
                typer.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            if main_rank():
                typer.echo("interrupted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="ipbench",
    cls=_OneLineErrors,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def _result_file_warnings() -> Iterator[None]:
    """A damaged or upgraded result file (results.FileNotice) is one stderr line ``warning: ...``, not
    Python's two-line warning; under torchrun a rank other than 0 names itself (it may be the one that repaired)."""
    from ipbench.results import FileNotice

    shown = warnings.showwarning

    def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, FileNotice):
            who = "" if main_rank() else f"rank {os.environ.get('RANK')}: "
            typer.echo(f"warning: {who}{' '.join(str(message).split())}", err=True)
        else:
            shown(message, category, *args, **kwargs)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def handle_errors(fn: F) -> F:
    """Turn UserError into one stderr line + exit 2, and Ctrl-C into exit 130 (rows are kept).

    Under torchrun only rank 0 prints the line (every rank has the same error: see runs.world).
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _result_file_warnings():
                return fn(*args, **kwargs)
        except UserError as exc:
            if main_rank():
                typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            if main_rank():
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
