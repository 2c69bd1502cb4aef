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

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ipbench.errors import UserError
from ipbench.measure.accuracy import TOP_K, Result
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
    counts: Tensor | None = None  # [B, depth] tokens per image after each block (image-adaptive reducers)


class Consumer(Protocol):
    """Takes a job's outputs batch by batch; its state is mergeable so that the states of several
    processes (torchrun ranks) add up to exactly what one process would have counted."""

    def add(self, out: Forward) -> None:
        """Take one batch's outputs into the consumer's state."""

    def state(self) -> Any:
        """The consumer's state as plain picklable values (counts, exact sums, records)."""

    def merge_all(self, states: list[Any]) -> None:
        """Become the merge of every process's `state()`, given in rank order (its own among them):
        the images of rank r come before those of rank r+1, as in the data's fixed order."""


class Accuracy:
    """Top-1/top-5 counts of a job (the one counting function, `measure.accuracy.topk_hits`)."""

    def __init__(self) -> None:
        self.result = Result()

    def add(self, out: Forward) -> None:
        self.result.add(out.logits, out.labels)

    def state(self) -> Result:
        return self.result

    def merge_all(self, states: list[Result]) -> None:
        self.result = sum(states, Result())


class Predictions:
    """Every image's label and top-5 predicted classes, in the order the images came: the per-image
    records that paired comparisons rest on. Ranks hold contiguous shards, so their records, put
    end to end in rank order, are the data's fixed order."""

    def __init__(self) -> None:
        self.labels: list[Tensor] = []
        self.top: list[Tensor] = []

    def add(self, out: Forward) -> None:
        self.labels.append(out.labels.to(torch.int64))
        self.top.append(out.logits.topk(min(TOP_K, out.logits.shape[-1]), dim=-1).indices.to(torch.int64))

    def state(self) -> tuple[Tensor, Tensor]:
        labels = torch.cat(self.labels) if self.labels else torch.empty(0, dtype=torch.int64)
        top = torch.cat(self.top) if self.top else torch.empty((0, TOP_K), dtype=torch.int64)
        return labels, top

    def merge_all(self, states: list[tuple[Tensor, Tensor]]) -> None:
        self.labels = [labels for labels, _ in states]
        self.top = [top for _, top in states if len(top)]

    def records(self) -> tuple[list[int], list[list[int]]]:
        """(label of each image, its top-k classes), image by image."""
        labels, top = self.state()
        return labels.tolist(), top.tolist()


class TokenTally:
    """Every image's token count after each block, for a reducer whose counts vary by image (ATS):
    the row's tokens and GMACs are then the per-image means (`runs.cost.adaptive_fields`)."""

    def __init__(self) -> None:
        self.rows: list[list[int]] = []

    def add(self, out: Forward) -> None:
        if out.counts is not None:
            self.rows.extend(out.counts.tolist())

    def state(self) -> list[list[int]]:
        return self.rows

    def merge_all(self, states: list[list[list[int]]]) -> None:
        self.rows = [r for s in states for r in s]


def merge_states(a: Any, b: Any) -> Any:
    """a + b for consumer states: dicts key by key (a key only one side has is taken as it is),
    anything else (ints, Result, Share, Moments, ExactSum) by its own exact `+`."""
    if isinstance(a, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = merge_states(out[k], v) if k in out else v
        return out
    return a + b


class Merged:
    """A consumer whose state is the attributes named in `merged` (each a mergeable value)."""

    merged: tuple[str, ...] = ()

    def state(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.merged}

    def merge_all(self, states: list[dict[str, Any]]) -> None:
        for name in self.merged:
            setattr(self, name, functools.reduce(merge_states, [s[name] for s in states]))


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
             progress: Progress | None = None, start: int | None = None, expected: int | None = None) -> int:
    """Run every job on every batch (uint8 images, labels) in the source's fixed order; return the
    number of images seen by every process together.

    The batch is normalised once, on the device and in the model dtype; each job forwards it once
    (after its transform) under the context's autocast; its consumers get float32 logits on the CPU.
    `start` is the position of the first image (default: the context's offset of decoded images).
    `progress.advance(n)` is called after each batch of n images.
    `expected` is the number of images the batches hold over every rank (decoded images); without
    it, under torchrun, the batches are the shards of the source and must cover all its images but
    the skipped ones.

    Under torchrun every rank runs its shard, then the consumers' states are gathered and merged
    in rank order, so that every rank ends holding the totals; a UserError on one rank (a bad
    image) is raised on every rank. A shard lost or counted twice is an error, never a number.
    """
    progress = progress or Silent()
    world = ctx.world
    first = ctx.offset if start is None else start

    def local() -> tuple[int, list[str], list[list[Any]]]:
        seen = first
        with torch.inference_mode(), ctx.precision():
            for images, labels in batches:
                x = ctx.inputs(images)
                indices = range(seen, seen + len(labels))
                for job in jobs:
                    logits = job.model(job.transform(x, indices) if job.transform is not None else x)
                    eng = getattr(job.model, "_ipb", None)
                    counts = eng.last_image_counts if eng is not None else None
                    out = Forward(start=seen, logits=logits.float().cpu(), labels=labels,
                                  trace=get_trace(job.model) if job.traced else None,
                                  counts=counts.cpu() if counts is not None else None)
                    for consumer in job.consumers:
                        consumer.add(out)
                seen += len(labels)
                progress.advance(len(labels) * world.size)
        states = [[c.state() for c in job.consumers] for job in jobs] if world.distributed else []
        return seen - first, list(ctx.source.skipped), states

    gathered = world.agree(local)
    seen = sum(n for n, _, _ in gathered)
    skipped = [m for _, msgs, _ in gathered for m in msgs]
    if world.distributed:
        for j, job in enumerate(jobs):
            for i, consumer in enumerate(job.consumers):
                consumer.merge_all([states[j][i] for _, _, states in gathered])
    if expected is not None and seen != expected:
        raise UserError(f"{seen} images measured over {world.size} process(es), but {expected} were decoded: "
                        "a shard was lost or counted twice")
    if expected is None:
        if world.distributed and seen + len(skipped) != ctx.source.num_images:
            raise UserError(f"{seen} images measured and {len(skipped)} skipped over {world.size} process(es), "
                            f"but the data has {ctx.source.num_images}: a shard was lost or counted twice")
        ctx.skipped = skipped
    return seen
