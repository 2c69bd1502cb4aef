"""The processes of one run: a single process, or the ranks torchrun started (torch.distributed).

ipbench never starts processes itself: ``torchrun --nproc-per-node N -m ipbench ...`` (or srun
around torchrun) does, and sets WORLD_SIZE, RANK and LOCAL_RANK; a plain ``ipbench ...`` is a
world of one. The rules every command follows under torchrun:

* Images are split into CONTIGUOUS, UNPADDED shards of the source's fixed order (rank r gets
  images [r*n//W, (r+1)*n//W); uneven sizes are fine): no image is seen twice, none is left out.
* Consumers keep integer counts and exact sums; they are gathered and added up after each pass,
  so every rank ends a pass holding the same totals a single process would have counted.
* Only rank 0 decides what to resume (the decision is broadcast), measures GMACs and speed,
  writes rows and prints.
* A UserError on any rank inside a pass or the decode reaches every rank at the next gather: all
  ranks stop with the same error, which rank 0 prints as one line, and no row is written.
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ipbench.errors import UserError

T = TypeVar("T")

# A rank waits this long in a collective for the others (rank 0 alone times every configuration
# while the other ranks wait at the first gather of the accuracy pass).
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=6)


def launched() -> bool:
    """Whether torchrun (or another torch.distributed launcher) started this process."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def env_rank() -> int:
    """This process's rank from the launcher's environment (0 without a launcher)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


@dataclass(frozen=True)
class World:
    """Where this process stands among the run's processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that resumes, writes and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, n: int) -> range:
        """This rank's contiguous share of n items in their fixed order (unpadded)."""
        return range(self.rank * n // self.size, (self.rank + 1) * n // self.size)

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, fn: Callable[[], T]) -> list[T]:
        """Run `fn` on every rank and gather its results, or raise on EVERY rank the first rank's
        UserError (prefixed with the rank it happened on): one rank's bad image stops all of them."""
        try:
            result, error = fn(), None
        except UserError as exc:
            if not self.distributed:
                raise
            result, error = None, str(exc)
        gathered = self.gather((error, result))
        for rank, (err, _) in enumerate(gathered):
            if err is not None:
                raise UserError(err if rank == self.rank else f"rank {rank}: {err}")
        return [r for _, r in gathered]


SINGLE = World()
_joined: World | None = None


def join(device: str) -> tuple[World, str]:
    """This process's World (the process group initialised once, if torchrun started it) and the
    device it computes on: cuda:LOCAL_RANK for every rank of a CUDA run, NCCL on CUDA, gloo on CPU."""
    global _joined
    if not launched():
        return SINGLE, device
    try:
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise UserError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {exc}") from None
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if _joined is None:
        if size > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo",
                                    timeout=COLLECTIVE_TIMEOUT)
            atexit.register(leave)
        _joined = World(rank=rank, size=size, local_rank=local_rank)
    return _joined, device


def leave() -> None:
    """Destroy the process group when the process exits (several commands of one process, as in
    the tests, share it)."""
    global _joined
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _joined = None
