"""ClassInterleavedSampler: every example once per epoch, successive examples from different classes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

import torch
from torch.utils.data import DistributedSampler, IterableDataset, Subset

from traincraft.data._interleave import SPACINGS, Spacing, deal_by_class, interleave_order, seeded_generator
from traincraft.data._sampler import process_placement


class ClassInterleavedSampler(DistributedSampler):
    """Shuffles the training set so that successive examples belong to different classes whenever the class
    counts allow it (LeCun et al., *Efficient BackProp*, 1998: "shuffle the training set so that successive
    training examples never (rarely) belong to the same class").

    Each epoch's order is a permutation of the data set drawn from ``(seed, epoch)``. **Bound**: with ``n``
    examples of which the largest class has ``m``, the order has exactly ``max(0, 2m - n - 1)`` pairs of
    same-class neighbours and no run of one class longer than ``ceil(m / (n - m + 1))``; both are the least any
    order can reach (the ``m`` examples form at most ``n - m + 1`` runs). So balanced data, and any data whose
    largest class is at most about half of it, never repeat a class; a majority class is cut into runs as even
    as possible, one other example between two runs.

    ``spacing`` chooses among the many such orders: ``"stratified"`` spreads every class evenly over the epoch
    (one example per ``1/count`` of it, jittered), so every batch holds the classes in proportion to the data
    set; ``"random"`` follows a uniform shuffle and departs from it only where a neighbour would repeat a class.

    Data parallel (``num_replicas > 1``): every rank draws the same split of the data set into ``num_replicas``
    disjoint shards of ``ceil(n / num_replicas)`` examples, each class dealt evenly across them (the last shards
    pad with repeats of the first examples, as ``DistributedSampler`` does), and orders its own shard by the rule
    above: the bound holds on every rank, for its shard's counts, so each rank's batches keep the property. A
    subclass of ``DistributedSampler``: Lightning uses it as it is under DDP instead of wrapping it (a wrapper
    would hand rank ``r`` every ``num_replicas``-th example, which breaks the property).

    Resuming: :meth:`state_dict` holds the epoch and the position in it; after :meth:`load_state_dict` the next
    iteration of that epoch continues where the saved run stopped. Under a ``Trainer``,
    :class:`~traincraft.data.ImageDataModule` saves Lightning's count of processed batches as the position (the
    loader prefetches, so the sampler's own count runs ahead); by hand, pass the examples consumed.

    Args:
        labels: the class of every training example, ``(N,)`` integers (``dataset.labels``).
        num_replicas: data-parallel processes; default: the ``torch.distributed`` world size, or 1.
        rank: this process's index among them; default: the ``torch.distributed`` rank, or 0.
        seed: base seed of the orders; the same on every rank.
        spacing: ``"stratified"`` or ``"random"`` (see above).

    Example:
        >>> labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
        >>> sampler = ClassInterleavedSampler(labels, seed=0)
        >>> order = list(sampler)
        >>> sorted(order) == list(range(10)), bool((labels[order][1:] != labels[order][:-1]).all())
        (True, True)
    """

    def __init__(
        self,
        labels: Union[torch.Tensor, Sequence[int]],
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
        seed: int = 0,
        spacing: Spacing = "stratified",
    ) -> None:
        labels = _as_labels(labels)
        if spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}; got {spacing!r}.")
        super().__init__(labels, **process_placement(num_replicas, rank), shuffle=True, seed=seed, drop_last=False)
        self.labels = labels
        self.spacing = spacing
        self._order: Optional[tuple[int, torch.Tensor]] = None
        self._resume: Optional[tuple[int, int]] = None  # (epoch, position) to start the next iteration at
        self.position = 0  # examples yielded so far in the current iteration (runs ahead of a prefetching loader)

    def epoch_order(self, epoch: Optional[int] = None, rank: Optional[int] = None) -> torch.Tensor:
        """The indices ``rank`` visits in ``epoch`` (default: this rank, the current epoch), in order."""
        epoch = self.epoch if epoch is None else epoch
        rank = self.rank if rank is None else rank
        if self._order is not None and self._order[0] == epoch and rank == self.rank:
            return self._order[1]
        shard = deal_by_class(self.labels, self.num_replicas, seeded_generator(self.seed, epoch))[rank]
        order = shard[interleave_order(self.labels[shard], self.spacing, seeded_generator(self.seed, epoch, rank + 1))]
        if rank == self.rank:
            self._order = (epoch, order)
        return order

    def __iter__(self) -> Iterator[int]:
        start = 0
        if self._resume is not None:
            epoch, position = self._resume
            self._resume = None
            start = position if epoch == self.epoch else 0  # a different epoch began: start it from the top
        order = self.epoch_order()[start:].tolist()
        self.position = start
        for index in order:
            self.position += 1
            yield index

    def state_dict(self, position: Optional[int] = None) -> dict[str, Any]:
        """The epoch and ``position`` (examples of it consumed on this rank; default: those yielded so far)."""
        return {"epoch": int(self.epoch), "position": int(self.position if position is None else position)}

    def state_after(self, batches: int, batch_size: int, epoch_batches: int) -> dict[str, Any]:
        """The state once ``batches`` batches of ``batch_size`` of this epoch's ``epoch_batches`` were processed;
        after the last one, the top of the next epoch (``drop_last`` may leave a tail unvisited)."""
        if batches >= epoch_batches:
            return {"epoch": int(self.epoch) + 1, "position": 0}
        return self.state_dict(position=batches * batch_size)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        epoch, position = int(state_dict["epoch"]), int(state_dict["position"])
        if epoch < 0 or position < 0:
            raise ValueError(f"a ClassInterleavedSampler state has a non-negative epoch and position; got {state_dict}. "
                             "Pass what state_dict() returned.")
        if position >= self.num_samples:  # the saved epoch was complete: the next one starts from its top
            epoch, position = epoch + 1, 0
        self.set_epoch(epoch)
        self._resume = (epoch, position)


def _as_labels(labels: Any) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.numel() == 0:
        raise ValueError(
            f"labels must be a non-empty 1-D sequence with the class of every training example; got shape "
            f"{tuple(labels.shape)}. Pass dataset.labels (one integer per example)."
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices; got dtype {labels.dtype}. Pass class ids, not "
                         "one-hot or soft targets.")
    return labels.to(torch.int64)


def check_interleavable(dataset: Any, owner: str) -> None:
    """Refuse a training set that class-interleaved sampling cannot order: a stream, or one without labels."""
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            f"sampler='class_interleaved' orders a map-style training set, but {owner} "
            "streams an iterable one (its order comes from the stream); use sampler='shuffle'."
        )
    dataset_labels(dataset)


def dataset_labels(dataset: Any) -> torch.Tensor:
    """The class of every example of ``dataset`` without loading its images: ``.labels`` (traincraft's
    datasets), ``.targets`` (torchvision's), ``.samples`` of ``(path, class)`` pairs, or a ``Subset`` of these."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.int64)]
    for name in ("labels", "targets"):
        value = getattr(dataset, name, None)
        if value is not None:
            return _as_labels(value)
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, Sequence) and samples and isinstance(samples[0], (tuple, list)):
        return _as_labels([sample[1] for sample in samples])
    raise TypeError(
        f"class-interleaved sampling needs the class of every training example, but the {type(dataset).__name__} "
        "training set has no `labels`, `targets` or `samples` of (path, class); give it a `labels` attribute "
        "(one integer per example) or use sampler='shuffle'."
    )
