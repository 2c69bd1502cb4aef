"""Top-1/top-5 counts: ONE counting function for every command, and a mergeable counter.

Counts are integers, so the counts of several batches, several passes or several processes add up
exactly (no running means); percentages are computed from them at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

TOP_K = 5  # top-5 is the literature's second accuracy


def topk_hits(logits: Tensor, labels: Tensor, k: int = TOP_K) -> tuple[int, int, int]:
    """(correct@1, correct@k, labelled images) of one batch; labels < 0 are unlabelled.

    With fewer than k classes, correct@k counts over all of them.
    """
    labelled = labels >= 0
    if not labelled.any():
        return 0, 0, 0
    logits, labels = logits[labelled], labels[labelled]
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
    hits = top == labels[:, None]
    return int(hits[:, 0].sum()), int(hits.any(dim=-1).sum()), int(labelled.sum())


@dataclass
class Result:
    """Counts over the images seen; top1/top5 are percentages, None when nothing was labelled."""

    correct1: int = 0
    correct5: int = 0
    total: int = 0  # labelled images
    images: int = 0  # all images seen

    def add(self, logits: Tensor, labels: Tensor) -> None:
        """Count one batch of logits [B, classes] against labels [B]."""
        c1, c5, n = topk_hits(logits, labels)
        self.correct1 += c1
        self.correct5 += c5
        self.total += n
        self.images += len(labels)

    def __add__(self, other: Result) -> Result:
        return Result(self.correct1 + other.correct1, self.correct5 + other.correct5,
                      self.total + other.total, self.images + other.images)

    @property
    def top1(self) -> float | None:
        return 100.0 * self.correct1 / self.total if self.total else None

    @property
    def top5(self) -> float | None:
        return 100.0 * self.correct5 / self.total if self.total else None
