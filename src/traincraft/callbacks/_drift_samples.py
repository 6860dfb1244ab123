"""Sample collection for DataDriftMonitor: a buffer of feature rows, a fixed subset of the training data, and
gathering across ranks in the order a single process would have seen."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader, Subset


class FeatureBuffer:
    """Keeps up to ``capacity`` feature rows on the device; shapes are host metadata, so filling never syncs."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.parts: list[torch.Tensor] = []
        self.rows = 0

    @property
    def full(self) -> bool:
        return self.rows >= self.capacity

    def add(self, features: torch.Tensor) -> None:
        if self.parts and features.shape[1] != self.parts[0].shape[1]:
            raise ValueError(
                f"DataDriftMonitor: this batch gives {features.shape[1]} features per sample and earlier batches "
                f"gave {self.parts[0].shape[1]}; every sample needs the same features. Sequences of different "
                f"lengths with reduce='flatten'? Use reduce='mean' or 'last', or pad to one length."
            )
        take = min(self.capacity - self.rows, features.shape[0])
        if take > 0:
            self.parts.append(features[:take].float().clone())
            self.rows += take

    def tensor(self) -> Optional[torch.Tensor]:
        return torch.cat(self.parts) if self.parts else None


def training_subset_loader(
    trainer: pl.Trainer, total: int, remembered: Optional[DataLoader] = None
) -> Optional[DataLoader]:
    """A loader over ``total`` evenly spaced training samples, this rank's share (``rank::world_size``): no shuffling
    and no draw from any random stream, so the training order is left as it was. The training loader is the
    trainer's, else ``remembered`` (from an earlier fit), else the datamodule's."""
    loader = trainer.train_dataloader if isinstance(trainer.train_dataloader, DataLoader) else remembered
    if loader is None and trainer.datamodule is not None:
        try:
            loader = trainer.datamodule.train_dataloader()
        except Exception:  # noqa: BLE001 - a datamodule not set up for fitting: the caller reports it
            loader = None
    if not isinstance(loader, DataLoader):
        return None
    size = len(loader.dataset)  # type: ignore[arg-type]
    count = min(total, size)
    picks = torch.linspace(0, size - 1, count).round().long().tolist()
    mine = picks[trainer.global_rank :: trainer.world_size]
    # a private generator: iterating a loader draws its base seed from it, which would otherwise shift the global
    # random stream (and with it the training that follows) at every validation
    return DataLoader(Subset(loader.dataset, mine), batch_size=loader.batch_size or 64, shuffle=False,
                      collate_fn=loader.collate_fn, num_workers=0, generator=torch.Generator().manual_seed(0))


def prepare_batch(trainer: pl.Trainer, batch: Any) -> Any:
    """A loader's batch as a step sees it: precision input conversion, ``on_before_batch_transfer`` (the module's if
    it overrides it, else the datamodule's, as Lightning chooses), then the strategy's transfer (which runs
    ``on_after_batch_transfer``: normalization, and augmentation only while ``trainer.training``)."""
    batch = trainer.precision_plugin.convert_input(batch)
    module, datamodule = trainer.lightning_module, trainer.datamodule
    if is_overridden("on_before_batch_transfer", module):
        batch = module.on_before_batch_transfer(batch, 0)
    elif datamodule is not None and is_overridden("on_before_batch_transfer", datamodule):
        batch = datamodule.on_before_batch_transfer(batch, 0)
    return trainer.strategy.batch_to_device(batch, module.device)


def gather_in_order(module: pl.LightningModule, local: torch.Tensor, capacity: int) -> torch.Tensor:
    """All ranks' rows, interleaved ``rank0[0], rank1[0], rank0[1], ...``: the order of a distributed sampler's
    shards put back together, i.e. the order one process would have seen."""
    world = module.trainer.world_size
    if world == 1:
        return local
    padded = torch.zeros(capacity, local.shape[1], dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    rows = module.all_gather(padded)  # (world, capacity, d)
    counts = module.all_gather(torch.tensor(local.shape[0], device=local.device))  # (world,)
    valid = torch.arange(capacity, device=local.device)[:, None] < counts[None, :]  # (capacity, world)
    return rows.transpose(0, 1)[valid]
