"""HardExampleSampler: draw high-loss examples more often, capped, the same draw on every DDP rank."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sized
from typing import Any, Optional

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DistributedSampler

from traincraft.data._sampler import process_placement
from traincraft.metrics.hard_examples import (
    check_hard_example_args,
    epoch_generator,
    hard_example_probabilities,
    sample_indices,
    update_loss_ema,
)


class HardExampleSampler(DistributedSampler):
    """Draws each epoch's training examples with probability growing with their recent loss.

    The sampler keeps an exponential moving average of every example's loss (updated once per epoch, only for the
    examples drawn in it) and draws ``epoch_size`` examples **with replacement** from
    :func:`~traincraft.metrics.hard_examples.hard_example_probabilities`: ``p ∝ loss ** (1 / temperature)``, mixed
    with uniform sampling (``uniform_mix``: a floor, no example is starved) and capped at ``cap`` times the uniform
    probability (no outlier, mislabelled or corrupt example can dominate the epoch). The first ``warmup_epochs``
    visit every example once in a shuffled order, so that every example gets a loss; examples never seen count as
    the mean of the seen ones.

    Data parallel: every rank draws the same indices (a generator seeded by ``(seed, epoch)`` and the same
    probabilities) and takes every ``num_replicas``-th of them from ``rank`` on, so the ranks share one draw.
    Losses are accumulated on the device without host synchronization (:meth:`record`) and summed over the ranks
    once per epoch (:meth:`refresh`), so every rank ends the epoch with the same averages. A subclass of
    ``DistributedSampler``: Lightning uses it as it is under DDP instead of wrapping it.

    :class:`~traincraft.callbacks.HardExampleMining` drives it from a ``Trainer``; used by hand, call ``set_epoch``
    before each epoch, ``record`` after each batch and ``refresh`` after each epoch.

    Args:
        dataset: the training dataset (only its length is used).
        num_replicas: data-parallel processes; default: the ``torch.distributed`` world size, or 1.
        rank: this process's index among them; default: the ``torch.distributed`` rank, or 0.
        seed: base seed of the draws; the same on every rank.
        decay: weight of the previous average when an example's new epoch losses arrive, in ``[0, 1)``.
        cap: largest probability as a multiple of the uniform ``1 / N``, ``>= 1``; ``math.inf``: no cap.
        uniform_mix: share of uniform sampling mixed in, in ``[0, 1]``.
        temperature: ``> 0``; probabilities follow ``loss ** (1 / temperature)``.
        warmup_epochs: first epochs that visit every example once (shuffled) instead of sampling.
        epoch_size: examples drawn per epoch over all ranks; default: the length of the dataset.

    Example:
        >>> sampler = HardExampleSampler(range(6), seed=0, warmup_epochs=0, cap=2.0, uniform_mix=0.0)
        >>> sampler.record(torch.arange(6), torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 10.0]))
        >>> sampler.refresh()
        {'examples_drawn': 6, 'nonfinite': 0}
        >>> (sampler.probabilities * 6).round(decimals=3).tolist()  # the outlier is capped at 2x uniform
        [0.8, 0.8, 0.8, 0.8, 0.8, 2.0]
        >>> len(list(sampler)), len(sampler)
        (6, 6)
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
        seed: int = 0,
        decay: float = 0.9,
        cap: float = 5.0,
        uniform_mix: float = 0.2,
        temperature: float = 1.0,
        warmup_epochs: int = 1,
        epoch_size: Optional[int] = None,
    ) -> None:
        check_hard_example_args(decay, cap, uniform_mix, temperature, warmup_epochs)
        super().__init__(dataset, **process_placement(num_replicas, rank), shuffle=True, seed=seed, drop_last=False)
        n = len(dataset)
        if n < 1:
            raise ValueError("HardExampleSampler needs a non-empty dataset; got one of length 0.")
        if epoch_size is None:
            epoch_size = n
        if not isinstance(epoch_size, int) or isinstance(epoch_size, bool) or epoch_size < 1:
            raise ValueError(f"epoch_size must be a positive integer (draws per epoch over all ranks); got {epoch_size!r}.")
        self.num_examples = n
        self.decay, self.cap, self.uniform_mix, self.temperature = decay, cap, uniform_mix, temperature
        self.warmup_epochs = warmup_epochs
        self.epoch_size = epoch_size
        # DistributedSampler's names: draws per rank, and over all ranks (epoch_size rounded up to a multiple).
        self.num_samples = math.ceil(epoch_size / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self.loss_ema = torch.zeros(n)
        self.seen = torch.zeros(n, dtype=torch.bool)
        self.indices: Optional[torch.Tensor] = None  # this rank's indices of the iteration in progress
        self.iteration = 0  # iterations started; tells a reader of `indices` that a new epoch's draw began
        self._probabilities = torch.full((n,), 1.0 / n, dtype=torch.float64)
        self._version = 0  # bumped whenever the probabilities change; part of the draw cache key
        self._draw: Optional[tuple[tuple[int, int], torch.Tensor]] = None
        self._accumulator: Optional[torch.Tensor] = None  # (N, 3): loss sum, finite count, non-finite count
        self._restored_epoch: Optional[int] = None  # the epoch of loss sums a checkpoint brought back
        # Optional reordering of this rank's share of a draw, (indices, epoch, rank) -> the same indices in another
        # order: ImageDataModule(sampler="class_interleaved") sets one that interleaves the classes.
        self.reorder: Optional[Callable[[torch.Tensor, int, int], torch.Tensor]] = None

    # ----------------------------------------------------------------- drawing
    @property
    def probabilities(self) -> torch.Tensor:
        """The hard-example distribution (float64, sums to 1) that epochs after the warm-up draw from."""
        return self._probabilities

    @property
    def in_warmup(self) -> bool:
        return self.epoch < self.warmup_epochs

    def epoch_draw(self) -> torch.Tensor:
        """All ``total_size`` indices of the current epoch, the same on every rank; rank ``r`` takes
        ``[r::num_replicas]``."""
        key = (self.epoch, self._version)
        if self._draw is None or self._draw[0] != key:
            generator = epoch_generator(self.seed, self.epoch)
            if self.in_warmup:  # every example once per pass, as many passes as epoch_size needs
                passes = math.ceil(self.total_size / self.num_examples)
                draw = torch.cat([torch.randperm(self.num_examples, generator=generator) for _ in range(passes)])
                draw = draw[: self.total_size]
            else:
                draw = sample_indices(self._probabilities, self.total_size, generator)
            self._draw = (key, draw)
        return self._draw[1]

    def __iter__(self) -> Iterator[int]:
        self.indices = self.epoch_draw()[self.rank : self.total_size : self.num_replicas]
        if self.reorder is not None:
            self.indices = self.reorder(self.indices, self.epoch, self.rank)
        self.iteration += 1
        return iter(self.indices.tolist())

    # ----------------------------------------------------------------- losses
    def to(self, device: torch.device | str) -> HardExampleSampler:
        """Keep the epoch's loss sums on ``device`` (where the losses are computed)."""
        device = torch.device(device)
        if self._accumulator is None:
            self._accumulator = torch.zeros(self.num_examples, 3, device=device)
        elif self._accumulator.device != device:
            self._accumulator = self._accumulator.to(device)
        return self

    def record(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        """Add the losses of examples ``indices`` (``(B,)`` each) to this epoch's sums, on the losses' device
        without host synchronization. Non-finite losses are counted apart and left out of the averages."""
        if losses.ndim != 1 or indices.shape != losses.shape:
            raise ValueError(
                f"record takes one loss per index: indices and losses of the same shape (B,); got indices "
                f"{tuple(indices.shape)} and losses {tuple(losses.shape)}."
            )
        if indices.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"indices must be an integer tensor; got dtype {indices.dtype}.")
        losses = losses.detach().float()
        self.to(losses.device)
        finite = torch.isfinite(losses)
        values = torch.stack([torch.where(finite, losses, 0.0), finite.float(), (~finite).float()], dim=1)
        self._accumulator.index_add_(0, indices.to(losses.device, torch.int64), values)

    def refresh(self, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict[str, int]:
        """End of epoch: sum the recorded losses over the ranks, update the averages of the examples drawn,
        recompute the probabilities and clear the sums. Every rank must call it (a collective).

        Args:
            reduce: sums a tensor over the ranks (``lambda t: trainer.strategy.reduce(t, reduce_op="sum")``);
                default: ``torch.distributed.all_reduce`` when a process group of more than one is initialized.

        Returns:
            ``examples_drawn``: distinct examples with a loss this epoch (all ranks); ``nonfinite``: non-finite
            losses left out.
        """
        totals = self._accumulator if self._accumulator is not None else torch.zeros(self.num_examples, 3)
        if reduce is not None:
            totals = reduce(totals)
        elif dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals)
        totals = totals.to("cpu", copy=True)  # sync point: once per epoch
        if self._accumulator is not None:
            self._accumulator.zero_()
        sums, counts, nonfinite = totals.unbind(1)
        self.loss_ema, self.seen = update_loss_ema(self.loss_ema, self.seen, sums, counts, self.decay)
        self._update_probabilities()
        return {"examples_drawn": int((counts > 0).sum()), "nonfinite": int(nonfinite.sum())}

    def finish_restored_epoch(self, current_epoch: int) -> Optional[dict[str, int]]:
        """After a resume: fold the restored loss sums in if their epoch is over. Lightning resumes a checkpoint
        written after an epoch's last batch at the next epoch, without that epoch's end hook; a checkpoint inside
        an epoch resumes that epoch, whose end folds the sums in as usual. Returns :meth:`refresh`'s summary when it
        folded (one process only: such sums are saved only there)."""
        restored, self._restored_epoch = self._restored_epoch, None
        if restored is None or current_epoch <= restored:
            return None
        return self.refresh(reduce=lambda tensor: tensor)

    def _update_probabilities(self) -> None:
        self._probabilities = hard_example_probabilities(
            self.loss_ema, self.cap, self.uniform_mix, self.temperature, seen=self.seen
        )
        self._version += 1

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The loss averages and the epoch: with the seed they fix every later draw. A checkpoint written inside an
        epoch (``ModelCheckpoint(every_n_train_steps=...)``) also carries the epoch's loss sums so far, which are
        folded into the averages after a resume as they would have been without one (:meth:`finish_restored_epoch`).
        Only in one process: under several, each rank holds its own share of the sums and a checkpoint keeps rank
        0's, so a resume continues from the averages of the last completed epoch."""
        state = {"loss_ema": self.loss_ema.clone(), "seen": self.seen.clone(), "epoch": int(self.epoch)}
        if self._accumulator is not None and self.num_replicas == 1:
            state["epoch_sums"] = self._accumulator.to("cpu", copy=True)  # sync point: checkpoints only
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        loss_ema, seen = state_dict["loss_ema"], state_dict["seen"]
        if tuple(loss_ema.shape) != (self.num_examples,) or tuple(seen.shape) != (self.num_examples,):
            raise ValueError(
                f"the checkpoint's hard-example state covers {loss_ema.numel()} examples but this training set has "
                f"{self.num_examples}; it was saved for a different data set. Train on the same data, or start "
                "without this state."
            )
        self.loss_ema = loss_ema.detach().float().cpu().clone()
        self.seen = seen.detach().bool().cpu().clone()
        self.set_epoch(int(state_dict.get("epoch", self.epoch)))
        sums = state_dict.get("epoch_sums")  # absent in checkpoints written at an epoch's end or before 0.3.0
        if sums is not None and self.num_replicas > 1:  # every rank would add the same sums: count them once, never
            sums = None
            rank_zero_warn("HardExampleSampler: the checkpoint was written inside an epoch by one process; its loss "
                           "sums of that epoch are left out under several processes (the averages continue from the "
                           "last completed epoch).")
        if sums is not None:
            if tuple(sums.shape) != (self.num_examples, 3):
                raise ValueError(f"the checkpoint's hard-example epoch sums have shape {tuple(sums.shape)}; expected "
                                 f"({self.num_examples}, 3). The checkpoint was not written by this version's sampler.")
            device = self._accumulator.device if self._accumulator is not None else "cpu"
            self._accumulator = sums.detach().float().to(device, copy=True)
            self._restored_epoch = self.epoch
        self._update_probabilities()
