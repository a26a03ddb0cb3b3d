"""The processes of one batch run: ``accelerate launch`` / ``torchrun`` start several and set ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; each takes its share of the items (see :func:`attncontrol.batch.run`), they wait
for each other around the shared manifest, and the counts are summed at the end."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass
class Workers:
    """This process's ``rank`` among ``world`` processes; ``dist`` is torch.distributed once initialised (None
    for a single process)."""

    rank: int = 0
    world: int = 1
    dist: Any = None

    @classmethod
    def from_env(cls) -> Workers:
        """The processes a launcher started (gloo on CPU, nccl with CUDA); one process without a launcher."""
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(rank, world)
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        return cls(rank, world, dist)

    @property
    def first(self) -> bool:
        """Whether this is the process that prepares and merges the output folder."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.dist is not None:
            self.dist.barrier()

    def device(self, asked: str | None) -> str | None:
        """The device asked for; with several processes and none asked, this process's own GPU (if any)."""
        if asked is not None or self.world <= 1:
            return asked
        import torch

        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else None

    def total(self, counts: list[int], device) -> list[int]:
        """``counts`` summed over the processes (every process gets the sums)."""
        if self.dist is None:
            return counts
        import torch

        summed = torch.tensor(counts, dtype=torch.int64, device=device)
        self.dist.all_reduce(summed)
        self.dist.barrier()
        return [int(x) for x in summed.tolist()]
