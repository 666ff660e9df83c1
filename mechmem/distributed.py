"""Several GPUs through torchrun: which rank does what, and the few collectives that join them.

`torchrun --nproc-per-node N experiments/run_alignment.py ...` starts N copies of the job; each
reads its rank from the environment (`init_from_env`). Work is split so that every piece is
computed exactly as the single-process run computes it:
- feature extraction: the feature store's chunks, round-robin; each rank writes its chunks into the
  same memory-mapped file, and rank 0 marks a round of chunks done once every rank has flushed;
- free generation: contiguous slices of the samples, gathered back in order;
- CNN training: each taxonomy's configurations, whole fused groups to a rank (`shard_configs`), so
  a configuration trains with the same batches, seeds and fusing as on one GPU.
A single process is `Dist()`: world size 1, where every collective is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar
from collections.abc import Sequence

import torch
import torch.distributed as td

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            td.barrier()

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order (any picklable object)."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        td.all_gather_object(out, obj)
        return out

    def share(self, items: Sequence[T]) -> Sequence[T]:
        """This rank's items of a round-robin split."""
        return items[self.rank :: self.world_size]


def init_from_env(backend: str | None = None) -> Dist:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, ...).

    Without torchrun (no WORLD_SIZE, or 1) nothing is initialised and `Dist()` is returned. With
    CUDA each rank takes GPU `LOCAL_RANK`, so "cuda" means its own GPU; the backend is then NCCL,
    else gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and backend != "gloo"
    if cuda:
        torch.cuda.set_device(local)
    if not td.is_initialized():
        kwargs: dict[str, Any] = {"device_id": torch.device("cuda", local)} if cuda else {}
        td.init_process_group(backend or ("nccl" if cuda else "gloo"), **kwargs)
    return Dist(rank, world)


def shutdown() -> None:
    if td.is_initialized():
        td.destroy_process_group()


def shard_configs(configs: Sequence, dist: Dist) -> tuple:
    """This rank's CNN configurations: whole same-shape groups round-robin, in the grid's order.

    Keeping a fused group on one rank keeps its floating-point order that of the single-GPU run.
    With more ranks than groups, groups are split config by config (each rank still gets work).
    """
    groups: dict = {}
    for c in configs:
        groups.setdefault(c.shape_key, []).append(c)
    if len(groups) >= dist.world_size:
        mine = {c for g in dist.share(list(groups.values())) for c in g}
        return tuple(c for c in configs if c in mine)
    return tuple(dist.share(tuple(configs)))
