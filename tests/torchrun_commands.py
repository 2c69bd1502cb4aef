"""Run several ipbench commands in ONE process (one torchrun launch for the lot): each argument is
a command line, e.g. ``"sweep --reducers tome,evit --no-speed --out OUT"``. Exits with the first
non-zero exit code."""

import shlex
import sys

from ipbench.cli import app


def main(argv: list[str]) -> int:
    for line in argv:
        code = app(shlex.split(line), prog_name="ipbench", standalone_mode=False)
        if code:
            return int(code)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
