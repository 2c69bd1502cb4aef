"""Assertions several test files share."""

from __future__ import annotations

from click.testing import Result


def assert_user_error(result: Result, message: str) -> None:
    """The promise for bad input: exit code 2, exactly one stderr line `error: ...` naming it, no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.output
