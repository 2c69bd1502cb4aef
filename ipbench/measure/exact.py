"""A float sum that is exact until it is read, so that sums over batches or processes never depend
on how the images were split.

A plain float sum rounds at every addition: the same cosines summed in batches of 32, of 64, or
in three torchrun shards give totals that differ in the last bits, and a mean that sits on a
rounding boundary then prints differently. `ExactSum` keeps the running total as a short list of
non-overlapping floats (Shewchuk's partials, the state `math.fsum` keeps), so any split and any
order of addition give the same correctly rounded value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


class ExactSum:
    """Sum of floats with no rounding until `value` is read; adding two sums is exact too."""

    __slots__ = ("partials",)

    def __init__(self, values: Iterable[float] = ()) -> None:
        self.partials: list[float] = []
        self.extend(values)

    def extend(self, values: Iterable[float]) -> None:
        """Add every value exactly (the partials stay non-overlapping; their sum is the exact total)."""
        partials = self.partials
        for x in values:
            i = 0
            for y in partials:
                if abs(x) < abs(y):
                    x, y = y, x
                hi = x + y
                lo = y - (hi - x)
                if lo:
                    partials[i] = lo
                    i += 1
                x = hi
            partials[i:] = [x]

    def __add__(self, other: ExactSum) -> ExactSum:
        out = ExactSum(self.partials)
        out.extend(other.partials)
        return out

    @property
    def value(self) -> float:
        """The exact total, rounded once to the nearest float."""
        return math.fsum(self.partials)

    def __getstate__(self) -> list[float]:
        return self.partials

    def __setstate__(self, state: list[float]) -> None:
        self.partials = state
