"""How a run tells the user what it is doing, without drawing anything itself.

The command line passes an object with these methods (a rich display); tests and library users
pass `Silent`. Runs never import a display library: the arrow points down only.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Phases with a counter (images, models, timings), and lines for the user."""

    def phase(self, description: str, total: int | None) -> None:
        """Start a new phase of `total` steps (None: unknown)."""

    def advance(self, n: int = 1, detail: str | None = None) -> None:
        """`n` more steps of the current phase done."""

    def set_done(self, done: int, total: int, detail: str) -> None:
        """The current phase is at `done` of `total`."""

    def row_written(self, message: str) -> None:
        """A result row is on disk (the overall count advances)."""

    def log(self, message: str) -> None:
        """A line for the user (a warning, what runs)."""


class Silent:
    """The Progress interface, doing nothing (tests, library use)."""

    def phase(self, description: str, total: int | None) -> None:
        return None

    def advance(self, n: int = 1, detail: str | None = None) -> None:
        return None

    def set_done(self, done: int, total: int, detail: str) -> None:
        return None

    def row_written(self, message: str) -> None:
        return None

    def log(self, message: str) -> None:
        return None
