"""HardExampleMining: train more often on the examples whose loss is high, with no example allowed to dominate."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from traincraft._steps import completed_step_is_logging
from traincraft.data.hard_example_sampler import HardExampleSampler
from traincraft.data.image_datamodule import ImageDataModule
from traincraft.metrics.hard_examples import check_hard_example_args, sampling_summary

_PREFIX = "hard_examples/"


class HardExampleMining(Callback):
    """Hard-example sampling: draw the training examples with probability growing with their recent loss.

    The theory: presenting high-error examples more often speeds up learning of what is not yet learnt, but the
    examples with the highest loss are often outliers (mislabelled, corrupt, ambiguous) that would then dominate
    training. So the probabilities are mixed with uniform sampling (``uniform_mix``: every example keeps a floor)
    and capped at ``cap`` times the uniform probability, the excess going to the others. See
    :class:`~traincraft.data.HardExampleSampler` for the rule.

    The callback puts a :class:`~traincraft.data.HardExampleSampler` into the training loader of the
    :class:`~traincraft.data.ImageDataModule` (instead of its shuffling sampler), reads the per-example losses the
    LightningModule returns from ``training_step`` (``{"loss": ..., "per_example_loss": ...}``, as
    :class:`~traincraft.modules.ImageClassifier` does), accumulates them on the device without host
    synchronization, and at the end of every training epoch sums them over the DDP ranks and updates the loss
    averages and the probabilities: every rank draws the same indices and takes its own share. The first
    ``warmup_epochs`` visit every example once. The averages travel in checkpoints; a run resumed at an epoch
    boundary draws exactly what the uninterrupted run draws. (A resume in the middle of an epoch replays that epoch
    from its start, as Lightning does for any non-resumable loader; the losses of the interrupted part are lost.)

    Logged at the end of every training epoch (``pl_module.log``, epoch level); the distribution keys describe what
    the next epoch draws from (after the warm-up):

    ================================== ====================================================================
    key                                meaning
    ================================== ====================================================================
    ``hard_examples/max_ratio``        largest probability as a multiple of uniform (at most ``cap``)
    ``hard_examples/min_ratio``        smallest probability as a multiple of uniform (at least ``uniform_mix``)
    ``hard_examples/capped_fraction``  fraction of the examples held at the cap
    ``hard_examples/ess_fraction``     effective sample size ``1 / Σp²`` as a fraction of ``N`` (1: uniform)
    ``hard_examples/loss_ema_mean``    mean loss average of the examples seen so far
    ``hard_examples/seen_fraction``    fraction of the examples with a loss average
    ``hard_examples/drawn_fraction``   fraction of the examples that got a loss this epoch (all ranks)
    ``hard_examples/nonfinite``        non-finite per-example losses left out this epoch (all ranks)
    ================================== ====================================================================

    Args:
        decay: weight of an example's previous loss average against its losses of a new epoch, in ``[0, 1)``.
        cap: largest probability as a multiple of the uniform ``1 / N``, ``>= 1`` (1: uniform; ``.inf``: no cap).
        uniform_mix: share of uniform sampling mixed in, in ``[0, 1]``.
        temperature: ``> 0``; probabilities follow ``loss ** (1 / temperature)`` (larger: flatter).
        warmup_epochs: first epochs that visit every example once in a shuffled order.
        epoch_size: examples drawn per epoch over all ranks; default: the size of the training set.
        check_labels: on logging steps, check that the batch's labels are those of the examples the sampler drew
            for it (one comparison on the device; needs a training set with a ``labels`` tensor).

    Example:
        >>> from traincraft.data import DigitsDataModule
        >>> from traincraft.modules import ImageClassifier
        >>> mining = HardExampleMining(cap=4.0, uniform_mix=0.25)
        >>> trainer = pl.Trainer(max_epochs=2, limit_train_batches=4, limit_val_batches=0, callbacks=[mining], logger=False,
        ...                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
        >>> model = ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=8, model_kwargs={"hidden": [16]})
        >>> trainer.fit(model, datamodule=DigitsDataModule(image_size=8, batch_size=64))
        >>> 1.0 < trainer.callback_metrics["hard_examples/max_ratio"] <= 4.0
        tensor(True)
    """

    def __init__(
        self,
        decay: float = 0.9,
        cap: float = 5.0,
        uniform_mix: float = 0.2,
        temperature: float = 1.0,
        warmup_epochs: int = 1,
        epoch_size: Optional[int] = None,
        check_labels: bool = True,
    ) -> None:
        super().__init__()
        check_hard_example_args(decay, cap, uniform_mix, temperature, warmup_epochs)
        if epoch_size is not None and (not isinstance(epoch_size, int) or isinstance(epoch_size, bool) or epoch_size < 1):
            raise ValueError(f"epoch_size must be None or a positive integer; got {epoch_size!r}.")
        self.decay, self.cap, self.uniform_mix, self.temperature = decay, cap, uniform_mix, temperature
        self.warmup_epochs, self.epoch_size, self.check_labels = warmup_epochs, epoch_size, check_labels
        self.sampler: Optional[HardExampleSampler] = None
        self._datamodule: Optional[ImageDataModule] = None
        self._pending_state: Optional[dict[str, Any]] = None  # loaded before setup built the sampler
        self._labels: Optional[Tensor] = None  # the training labels on the device, for check_labels
        self._iteration = -1  # the sampler iteration whose positions _offset counts
        self._offset = 0
        self._indices: Optional[Tensor] = None  # this rank's indices of the epoch, on the device

    @property
    def state_key(self) -> str:
        # No arguments: one per Trainer (Lightning refuses two stateful callbacks with one key, and two would fight
        # over the training sampler), and a resumed run may change cap, mix, temperature or decay and keep its
        # loss averages.
        return self._generate_state_key()

    # ------------------------------------------------------------------------------- set up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = trainer.datamodule
        if not isinstance(datamodule, ImageDataModule):
            got = "no datamodule (loaders passed directly)" if datamodule is None else type(datamodule).__name__
            raise TypeError(
                f"HardExampleMining replaces the training sampler of a traincraft ImageDataModule; got {got}. Pass "
                "one (e.g. DigitsDataModule, ImageFolderDataModule) as trainer.fit(model, datamodule=...), or put a "
                "traincraft.data.HardExampleSampler into your own DataLoader and call its record() and refresh()."
            )
        dataset = datamodule.datasets.get("train")
        if dataset is None:
            raise ValueError(f"{type(datamodule).__name__} has no 'train' split after setup; HardExampleMining needs one.")
        placement = trainer.distributed_sampler_kwargs or {"num_replicas": 1, "rank": 0}
        sampler = HardExampleSampler(
            dataset, num_replicas=placement["num_replicas"], rank=placement["rank"], seed=datamodule.seed,
            decay=self.decay, cap=self.cap, uniform_mix=self.uniform_mix, temperature=self.temperature,
            warmup_epochs=self.warmup_epochs, epoch_size=self.epoch_size,
        )
        state = self._pending_state
        if state is None and self.sampler is not None and self.sampler.num_examples == sampler.num_examples:
            state = self.sampler.state_dict()  # a later fit of the same callback continues its averages
        if state is not None:
            sampler.load_state_dict(state)
        self._pending_state = None
        self.sampler, self._datamodule, self._iteration = sampler, datamodule, -1
        labels = getattr(dataset, "labels", None)
        self._labels = labels if self.check_labels and isinstance(labels, Tensor) and len(labels) == len(dataset) else None
        datamodule.set_train_sampler(sampler)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._datamodule is not None and self._datamodule._train_sampler is self.sampler:
            self._datamodule.set_train_sampler(None)  # the DataModule shuffles as before in later fits

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.sampler is not None
        loaders = trainer.train_dataloader
        loaders = list(loaders.values()) if isinstance(loaders, Mapping) else loaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        if not any(getattr(loader, "sampler", None) is self.sampler for loader in loaders):
            raise RuntimeError(
                f"HardExampleMining: the training loader of {type(self._datamodule).__name__} does not draw with the "
                "HardExampleSampler it was given. A train_dataloader override must build its loader with "
                "self._loader('train', train=True), or pass self._train_sampler as the DataLoader's sampler."
            )
        self.sampler.to(pl_module.device)
        self.sampler.finish_restored_epoch(trainer.current_epoch)  # a checkpoint after an epoch's last batch
        if self._labels is not None:
            self._labels = self._labels.to(pl_module.device)

    # ------------------------------------------------------------------------------- every batch
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        sampler = self.sampler
        assert sampler is not None and sampler.indices is not None
        if sampler.iteration != self._iteration:  # a new pass over the loader: positions restart at 0
            self._iteration, self._offset = sampler.iteration, 0
            self._indices = sampler.indices.to(pl_module.device, non_blocking=True)
        size = _batch_size(batch)
        if outputs is None:  # training_step returned None: Lightning skips the batch; nothing to record
            self._offset += size or 0
            return
        losses = self._per_example_losses(outputs, size)
        start, stop = self._offset, self._offset + losses.shape[0]
        if stop > self._indices.shape[0]:
            raise RuntimeError(
                f"HardExampleMining: training batch {batch_idx} would cover positions [{start}, {stop}) of this "
                f"rank's {self._indices.shape[0]} drawn indices. The loader yields more examples than the sampler "
                "drew: it must use the HardExampleSampler as its sampler, without a batch sampler or a wrapper."
            )
        indices = self._indices[start:stop]
        sampler.record(indices, losses)
        if self._labels is not None and completed_step_is_logging(trainer):
            self._check_labels(batch, indices, batch_idx, start, stop)
        self._offset = stop

    def _per_example_losses(self, outputs: Any, size: Optional[int]) -> Tensor:
        losses = outputs.get("per_example_loss") if isinstance(outputs, Mapping) else None
        if not isinstance(losses, Tensor):
            got = f"a dict with keys {sorted(outputs)}" if isinstance(outputs, Mapping) else type(outputs).__name__
            raise TypeError(
                f"HardExampleMining needs the loss of every example of the training batch, but training_step returned "
                f"{got}. Return a dict: `per_example = F.cross_entropy(logits, y, reduction='none')` and "
                "`return {'loss': per_example.mean(), 'per_example_loss': per_example.detach()}` (traincraft's "
                "ImageClassifier does this)."
            )
        if losses.ndim != 1 or (size is not None and losses.shape[0] != size):
            raise ValueError(
                f"HardExampleMining: 'per_example_loss' must have one entry per example of the batch, shape "
                f"({size if size is not None else 'batch'},); got shape {tuple(losses.shape)}. Compute it with "
                "reduction='none' and average any other dimension."
            )
        return losses

    def _check_labels(self, batch: Any, indices: Tensor, batch_idx: int, start: int, stop: int) -> None:
        targets = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        if not isinstance(targets, Tensor) or targets.shape != indices.shape:
            return
        if not torch.equal(targets, self._labels[indices].to(targets.dtype)):  # sync point: logging step only
            raise RuntimeError(
                f"HardExampleMining: the labels of training batch {batch_idx} are not those of the examples the sampler "
                f"drew for its positions [{start}, {stop}): the loader does not yield the sampler's indices in order "
                "(a custom train_dataloader, a batch sampler or a shuffling wrapper?), so losses would be credited "
                "to the wrong examples. Set check_labels=False only if the labels change on purpose."
            )

    # ------------------------------------------------------------------------------- every epoch
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sampler = self.sampler
        assert sampler is not None
        stats = sampler.refresh(reduce=lambda tensor: trainer.strategy.reduce(tensor, reduce_op="sum"))
        sampler.set_epoch(trainer.current_epoch + 1)  # the checkpoint of this epoch's end names the next draw
        n = sampler.num_examples
        summary = {key: float(value) for key, value in sampling_summary(sampler.probabilities, self.cap).items()}
        seen = int(sampler.seen.sum())
        summary.update({
            "loss_ema_mean": float(sampler.loss_ema[sampler.seen].mean()) if seen else 0.0,
            "seen_fraction": seen / n,
            "drawn_fraction": stats["examples_drawn"] / n,
            "nonfinite": float(stats["nonfinite"]),
        })
        # the same numbers on every rank (computed from all-reduced sums): no reduction needed
        pl_module.log_dict({_PREFIX + key: value for key, value in summary.items()}, on_step=False, on_epoch=True,
                           sync_dist=False)
        if stats["nonfinite"]:
            rank_zero_warn(f"HardExampleMining: {stats['nonfinite']} per-example losses were not finite this epoch; "
                           "they were left out of the loss averages.")

    # ------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        if self.sampler is not None:
            return self.sampler.state_dict()
        return dict(self._pending_state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.sampler is not None:
            self.sampler.load_state_dict(state_dict)
        else:
            self._pending_state = dict(state_dict)


def _batch_size(batch: Any) -> Optional[int]:
    first = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if isinstance(first, Mapping):
        first = next(iter(first.values()), None)
    return int(first.shape[0]) if isinstance(first, Tensor) and first.ndim > 0 else None

