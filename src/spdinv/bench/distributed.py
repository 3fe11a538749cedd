"""Multi-process and multi-node runs. `torchrun` and `accelerate launch` both describe the process
in RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT); a gloo group is enough here:
ranks only meet to gather their rows and to wait for the merge."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")
# Ranks finish their shards at different times; the slowest may be hours behind on a big run.
BARRIER_TIMEOUT = timedelta(days=2)


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def take(self, items: list[T]) -> list[T]:
        """This rank's share: every world_size-th item from its rank on (a fixed split of the
        whole list, so it never depends on what earlier runs finished)."""
        return items[self.rank::self.world_size]

    def device(self, device: str) -> str:
        """cuda -> cuda:LOCAL_RANK when several processes share a node."""
        return f"cuda:{self.local_rank}" if device == "cuda" and self.distributed else device


def current_shard() -> Shard:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return Shard(rank, world_size, int(os.environ.get("LOCAL_RANK", str(rank))))


class ProcessGroup:
    """A gloo process group for the duration of a `with` block (nothing for one process)."""

    def __init__(self, shard: Shard):
        self.shard = shard
        self._owned = False

    def __enter__(self) -> "ProcessGroup":
        if self.shard.distributed and not dist.is_initialized():
            dist.init_process_group("gloo", rank=self.shard.rank, world_size=self.shard.world_size,
                                    timeout=BARRIER_TIMEOUT)
            self._owned = True
        return self

    def __exit__(self, *exc) -> None:
        if self._owned:
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.shard.distributed:
            dist.barrier()

    def gather(self, value: T) -> list[T] | None:
        """Every rank's value on rank 0 (in rank order); None elsewhere."""
        if not self.shard.distributed:
            return [value]
        gathered: list[T] | None = [None] * self.shard.world_size if self.shard.is_main else None  # type: ignore[list-item]
        dist.gather_object(value, gathered, dst=0)
        return gathered

