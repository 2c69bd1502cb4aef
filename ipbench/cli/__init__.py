"""The ipbench command line: the ONLY package that imports typer or click or draws with rich.

Commands are grouped by theme (measure, analyses, outputs, reproduce, info); each is one small
function that parses its options and calls one function in `ipbench.runs` (or `ipbench.plots`).
torch, timm and pandas are imported inside the commands so that ``ipbench --help`` stays fast.
"""

from ipbench.cli import measure, train, analyses, outputs, reproduce, info  # noqa: F401, I001  (registers the commands, in --help order)
from ipbench.cli.app import app


def main() -> None:
    """Console-script entry point (`ipbench`, `python -m ipbench`).

    Under torchrun, ranks other than 0 print nothing to stdout (rank 0 prints the tables of all).
    """
    import os
    import sys

    from ipbench.cli.app import main_rank

    if not main_rank():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the life of the process)
    app(prog_name="ipbench")


__all__ = ["app", "main"]
