"""A shuffling sampler whose order depends only on (seed, epoch)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import RandomSampler


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
