"""Top-1/top-5 of several models over the same decoded batches (exact counts, fixed order)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from torch import Tensor, nn

from ipbench.data import normalize


@dataclass
class Result:
    """Counts over the labelled images; top1/top5 are percentages, None when nothing was labelled."""

    correct1: int = 0
    correct5: int = 0
    total: int = 0  # labelled images
    images: int = 0  # all images seen

    @property
    def top1(self) -> float | None:
        return 100.0 * self.correct1 / self.total if self.total else None

    @property
    def top5(self) -> float | None:
        return 100.0 * self.correct5 / self.total if self.total else None


class _ImagesPerSecond(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} img/s" if speed else "… img/s", style="progress.data.speed")


def progress_bar(console: Console | None = None) -> Progress:
    """A rich progress bar counting images, with images/s and ETA (on stderr by default)."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _ImagesPerSecond(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        transient=True,  # the table that follows carries the numbers; errors stay one line
    )


def _update(result: Result, logits: Tensor, labels: Tensor) -> None:
    result.images += len(labels)
    labelled = labels >= 0
    if not labelled.any():
        return
    logits, labels = logits[labelled], labels[labelled]
    k = min(5, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    hits = top == labels[:, None]
    result.correct1 += int(hits[:, 0].sum())
    result.correct5 += int(hits.any(dim=-1).sum())
    result.total += len(labels)


def evaluate(models: dict[str, nn.Module], batches: Iterable[tuple[Tensor, Tensor]],
             mean: tuple[float, ...], std: tuple[float, ...], device: str = "cpu",
             progress: bool = True, total: int | None = None,
             dtype: torch.dtype = torch.float32) -> dict[str, Result]:
    """Run every model on each normalised batch once; labels < 0 count as unlabelled."""
    results = {name: Result() for name in models}
    bar = progress_bar() if progress else None
    task = bar.add_task("eval", total=total) if bar else None
    try:
        if bar:
            bar.start()
        with torch.inference_mode():
            for images, labels in batches:
                x = normalize(images.to(device, non_blocking=True), mean, std).to(dtype)
                for name, model in models.items():
                    _update(results[name], model(x).float().cpu(), labels)
                if bar and task is not None:
                    bar.advance(task, len(labels))
    finally:
        if bar:
            bar.stop()
    return results
