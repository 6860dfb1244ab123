"""A shuffling sampler whose order depends only on (seed, epoch), and the process placement of the others."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch
import torch.distributed as dist
from torch.utils.data import RandomSampler


def process_placement(num_replicas: Optional[int], rank: Optional[int]) -> dict[str, int]:
    """``DistributedSampler``'s ``num_replicas`` and ``rank``: those given, else the ``torch.distributed`` world
    size and rank, else one process (rank 0)."""
    distributed = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if distributed else 1
    if rank is None:
        rank = dist.get_rank() if distributed else 0
    return {"num_replicas": num_replicas, "rank": rank}


class EpochShuffleSampler(RandomSampler):
    """Random permutation seeded by ``(seed, epoch)``; Lightning calls ``set_epoch`` before every epoch.

    A ``RandomSampler`` (so Lightning recognises the loader as shuffled and swaps in a shuffling
    ``DistributedSampler`` under DDP) whose order does not depend on the global RNG: a run resumed from a
    checkpoint sees the same order as an uninterrupted one.
    """

    def __init__(self, data_source, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()
