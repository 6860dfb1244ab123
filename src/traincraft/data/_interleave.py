"""Class-interleaved orders: pure functions behind :class:`~traincraft.data.ClassInterleavedSampler`.

The rule ("shuffle so that successive training examples rarely belong to the same class") and the bound it meets:
with ``n`` examples of which the largest class has ``m``, no ordering can do better than

- ``max(0, 2m - n - 1)`` same-class neighbours: the ``m`` examples fall into at most ``n - m + 1`` runs, because
  runs of one class are separated by at least one other example;
- a longest run of ``ceil(m / (n - m + 1))`` examples of one class, for the same reason;

and :func:`interleave_order` meets both exactly (0 neighbours and runs of 1 whenever ``m <= n - m + 1``).
"""

from __future__ import annotations

import heapq
import math
from typing import Literal

import numpy as np
import torch

Spacing = Literal["stratified", "random"]
SPACINGS = ("stratified", "random")


def interleave_bound(counts: list[int]) -> tuple[int, int]:
    """``(longest run, same-class neighbours)``: the least any ordering of a multiset with these class counts
    reaches, and what :func:`interleave_order` guarantees.

    Example:
        >>> interleave_bound([5, 5]), interleave_bound([8, 1, 1])
        ((1, 0), (3, 5))
    """
    counts = [int(c) for c in counts if c > 0]
    n = sum(counts)
    if n == 0:
        return 0, 0
    m = max(counts)
    return max(1, math.ceil(m / (n - m + 1))), max(0, 2 * m - n - 1)


def longest_run(classes: torch.Tensor) -> int:
    """Length of the longest run of equal consecutive values."""
    if classes.numel() == 0:
        return 0
    change = torch.nonzero(classes[1:] != classes[:-1]).flatten() + 1
    edges = torch.cat([torch.tensor([0]), change, torch.tensor([classes.numel()])])
    return int((edges[1:] - edges[:-1]).max())


def same_class_neighbours(classes: torch.Tensor) -> int:
    """Number of positions ``i`` with ``classes[i] == classes[i + 1]``."""
    return int((classes[1:] == classes[:-1]).sum())


def seeded_generator(*words: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of integers (seed, epoch, rank...): independent streams per tuple."""
    state = np.random.SeedSequence([int(w) for w in words] + [0x1C1A55]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 31) ^ int(state[1]))


def _keys(counts: list[int], spacing: Spacing, generator: torch.Generator) -> list[list[float]]:
    # Where each class would like its j-th example in [0, 1): "stratified" spreads a class evenly over the epoch
    # (one example per 1/c stratum, jittered), so every window of the sequence holds the classes in proportion;
    # "random" uses sorted uniform draws, whose merge is the order of a uniform shuffle.
    u = torch.rand(sum(counts), generator=generator, dtype=torch.float64)
    keys = []
    for c, draws in zip(counts, u.split(counts), strict=True):
        keys.append(((torch.arange(c) + draws) / c if spacing == "stratified" else draws.sort().values).tolist())
    return keys


def class_sequence(counts: list[int], spacing: Spacing, generator: torch.Generator) -> list[int]:
    """A sequence of class ids (``counts[k]`` times ``k``) meeting :func:`interleave_bound`, following the classes'
    keys except where a neighbour or the remaining counts force another choice."""
    n = sum(counts)
    if n == 0:
        return []
    keys = _keys(counts, spacing, generator)
    major = max(range(len(counts)), key=counts.__getitem__)
    m = counts[major]
    if 2 * m > n + 1:  # one class is the majority: n - m + 1 groups of it, one other example between two groups
        groups = n - m + 1
        sizes = [m // groups] * groups
        for g in torch.randperm(groups, generator=generator)[: m % groups].tolist():
            sizes[g] += 1
        others = sorted((key, k) for k, ks in enumerate(keys) if k != major for key in ks)
        out: list[int] = []
        for g, size in enumerate(sizes):
            out.extend([major] * size)
            if g < len(others):
                out.append(others[g][1])
        return out
    # Greedy in key order. Feasible state (remaining counts c, R examples, previous class p): c_p <= R // 2 and
    # every c_k <= (R + 1) // 2. Picking any k != p keeps it so unless some class j != p has 2 c_j == R + 1 (then
    # j must come now and at every other position after): the rule below, checked on the largest count only.
    remaining = list(counts)
    position = [0] * len(counts)
    by_key = [(ks[0], k, 0) for k, ks in enumerate(keys) if ks]  # (key, class, which of its examples)
    by_count = [(-c, k) for k, c in enumerate(counts) if c]
    heapq.heapify(by_key)
    heapq.heapify(by_count)
    out, previous, left = [], -1, n
    for _ in range(n):
        while -by_count[0][0] != remaining[by_count[0][1]]:  # lazily drop counts that changed
            heapq.heappop(by_count)
        largest = by_count[0][1]
        if 2 * remaining[largest] == left + 1:
            choice = largest
        else:
            while by_key[0][2] != position[by_key[0][1]]:  # lazily drop keys of examples already placed
                heapq.heappop(by_key)
            choice = by_key[0][1]
            if choice == previous:
                held = heapq.heappop(by_key)
                while by_key[0][2] != position[by_key[0][1]]:
                    heapq.heappop(by_key)
                choice = by_key[0][1]
                heapq.heappush(by_key, held)
        out.append(choice)
        remaining[choice] -= 1
        position[choice] += 1
        left -= 1
        previous = choice
        if remaining[choice]:
            heapq.heappush(by_key, (keys[choice][position[choice]], choice, position[choice]))
            heapq.heappush(by_count, (-remaining[choice], choice))
    return out


def interleave_order(labels: torch.Tensor, spacing: Spacing, generator: torch.Generator) -> torch.Tensor:
    """A permutation ``order`` of ``range(len(labels))`` such that ``labels[order]`` meets
    :func:`interleave_bound`; examples of one class appear in a random order.

    Example:
        >>> labels = torch.tensor([0, 0, 0, 1, 1, 2])
        >>> order = interleave_order(labels, "random", torch.Generator().manual_seed(0))
        >>> sorted(order.tolist()), same_class_neighbours(labels[order])
        ([0, 1, 2, 3, 4, 5], 0)
    """
    labels = torch.as_tensor(labels).flatten()
    if labels.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    shuffled = torch.randperm(labels.numel(), generator=generator)
    members = shuffled[torch.sort(inverse[shuffled], stable=True).indices]  # grouped by class, random within
    sequence = torch.tensor(class_sequence(counts.tolist(), spacing, generator), dtype=torch.int64)
    order = torch.empty_like(members)
    # the j-th slot of class k takes the j-th member of class k
    order[torch.sort(sequence, stable=True).indices] = members
    return order


def deal_by_class(labels: torch.Tensor, num_replicas: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Split ``range(len(labels))`` into ``num_replicas`` shards of ``ceil(N / num_replicas)`` indices, each with
    every class's count within one of ``count / num_replicas``: the examples, grouped by class (classes and
    members in a random order), are dealt round-robin. The last ``total - N`` places repeat the first examples
    dealt, as ``DistributedSampler`` pads, so that every rank has the same number of batches."""
    n = labels.numel()
    classes, inverse = torch.unique(labels, return_inverse=True)
    shuffled = torch.randperm(n, generator=generator)
    class_rank = torch.randperm(classes.numel(), generator=generator)[inverse[shuffled]]
    dealt = shuffled[torch.sort(class_rank, stable=True).indices]
    total = math.ceil(n / num_replicas) * num_replicas
    if total > n:
        dealt = dealt.repeat(math.ceil(total / n))[:total]
    return [dealt[r::num_replicas] for r in range(num_replicas)]


class ClassOrder:
    """Orders one rank's hard-example draw by class (:func:`interleave_order`), reproducibly per (epoch, rank):
    the ``reorder`` of a :class:`~traincraft.data.HardExampleSampler` under ``sampler="class_interleaved"``."""

    def __init__(self, labels: torch.Tensor, seed: int, spacing: str) -> None:
        self.labels, self.seed, self.spacing = labels, seed, spacing

    def __call__(self, indices: torch.Tensor, epoch: int, rank: int) -> torch.Tensor:
        return indices[interleave_order(self.labels[indices], self.spacing, seeded_generator(self.seed, epoch, rank, 7))]
