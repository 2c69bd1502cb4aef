"""The ONE batch loop: for each batch of images, for each job, forward once, hand the outputs on.

Every command that runs a model over images (eval, the sweep's accuracy, every analysis) runs
through `run_jobs`. A job is a model (a configuration), an optional input transform (the
robustness masks) and its consumers: a top-1/top-5 counter, an analysis's collector, a per-image
record. Consumers keep mergeable state (integer counts and sums, never running means), so the
counts of several batches, several passes and, later, several processes add up exactly.

Which images a pass sees is the caller's choice: batches of images decoded once (each
configuration its own pass, its row written as soon as it is done) or batches streamed from the
source (every configuration on each batch, for data that does not fit in memory).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ipbench.measure.accuracy import Result
from ipbench.reducers.trace import Trace, get_trace
from ipbench.runs.context import RunContext
from ipbench.runs.progress import Progress, Silent


@dataclass
class Forward:
    """One job's outputs on one batch."""

    start: int  # index of the batch's first image in the source's fixed order
    logits: Tensor  # float32, on the CPU
    labels: Tensor  # -1 for unlabelled images
    trace: Trace | None = None  # the reducer's trace of this batch, for traced jobs


class Consumer(Protocol):
    def add(self, out: Forward) -> None:
        """Take one batch's outputs into the consumer's state."""


class Accuracy:
    """Top-1/top-5 counts of a job (the one counting function, `measure.accuracy.topk_hits`)."""

    def __init__(self) -> None:
        self.result = Result()

    def add(self, out: Forward) -> None:
        self.result.add(out.logits, out.labels)


Transform = Callable[[Tensor, range], Tensor]  # (normalised batch, image indices) -> model input


@dataclass
class Job:
    """A model, what is done to its input, and who takes its outputs."""

    name: str
    model: nn.Module
    consumers: list[Any] = field(default_factory=list)
    transform: Transform | None = None
    traced: bool = False


def run_jobs(ctx: RunContext, batches: Iterable[tuple[Tensor, Tensor]], jobs: list[Job],
             progress: Progress | None = None) -> None:
    """Run every job on every batch (uint8 images, labels), in the source's fixed order.

    The batch is normalised once, on the device and in the model dtype; each job forwards it once
    (after its transform) under the context's autocast; its consumers get float32 logits on the CPU.
    `progress.advance(n)` is called after each batch of n images.
    """
    progress = progress or Silent()
    start = 0
    with torch.inference_mode(), ctx.precision():
        for images, labels in batches:
            x = ctx.inputs(images)
            indices = range(start, start + len(labels))
            for job in jobs:
                logits = job.model(job.transform(x, indices) if job.transform is not None else x)
                out = Forward(start=start, logits=logits.float().cpu(), labels=labels,
                              trace=get_trace(job.model) if job.traced else None)
                for consumer in job.consumers:
                    consumer.add(out)
            start += len(labels)
            progress.advance(len(labels))
