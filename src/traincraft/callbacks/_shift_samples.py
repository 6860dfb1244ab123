"""Sample collection for DataDriftMonitor: features from a forward hook, a fixed subset of the training data, and
gathering across ranks in the order a single process would have seen."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset


def as_features(output: Any) -> Optional[torch.Tensor]:
    """A module output as ``(N, features)``: the first tensor of a tuple, spatial dimensions averaged away."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor) or output.ndim == 0:
        return None
    x = output.detach()
    if x.ndim == 1:
        return x[:, None]
    return x.flatten(2).mean(2) if x.ndim > 2 else x


class FeatureBuffer:
    """Keeps up to ``capacity`` feature rows on the device; shapes are host metadata, so filling never syncs."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.parts: list[torch.Tensor] = []
        self.rows = 0

    def add(self, features: torch.Tensor) -> None:
        take = min(self.capacity - self.rows, features.shape[0])
        if take > 0:
            self.parts.append(features[:take].float().clone())
            self.rows += take

    def tensor(self) -> Optional[torch.Tensor]:
        return torch.cat(self.parts) if self.parts else None


def training_subset_loader(trainer: pl.Trainer, total: int, remembered: Optional[DataLoader] = None) -> Optional[DataLoader]:
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
    return DataLoader(Subset(loader.dataset, mine), batch_size=loader.batch_size or 64, shuffle=False,
                      collate_fn=loader.collate_fn, num_workers=0)


def model_inputs(batch: Any) -> Any:
    """The inputs of a batch: the first element of ``(inputs, targets, ...)``, else the batch itself."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


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


def resolve_layer(root: nn.Module, layer: Optional[str]) -> nn.Module:
    if layer is None:
        return root
    try:
        return root.get_submodule(layer)
    except AttributeError:
        names = [name for name, _ in root.named_modules() if name]
        raise ValueError(
            f"layer={layer!r} is not a module of {type(root).__name__}; use None (the model's output) or one of "
            f"{names[:12]}{' ...' if len(names) > 12 else ''}."
        ) from None
