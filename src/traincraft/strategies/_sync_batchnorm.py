"""Synchronized batch norm on CPU/gloo, where torch's ``SyncBatchNorm`` refuses to run, for both strategies.

``Trainer(sync_batchnorm=True)`` makes Lightning convert every batch norm to ``nn.SyncBatchNorm`` (over the whole
world); the strategies then swap those for :class:`GlooSyncBatchNorm` on CPU. Under column parallelism the
statistics must come from the replicas of one column only (its columns see the same images, and the other column's
layers are not even on this rank), so :class:`GroupSyncBatchNorm` converts over the column's data-parallel group.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from lightning.pytorch.plugins import TorchSyncBatchNorm
from torch import nn

from traincraft.strategies._all_reduce import AllReduceSum
from traincraft.strategies.communication import CommunicationLedger


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Synchronized batch norm that also runs on CPU/gloo.

    Per channel, each rank contributes (Σx, Σx², count) in float64 to one all-reduce of 2C+1 elements (and one
    more in the backward pass): the statistics of the global batch, as ``nn.SyncBatchNorm`` computes them.
    Created from an ``nn.SyncBatchNorm`` (sharing its parameters and buffers, and synchronizing over its process
    group, ``None`` for the whole world) by the strategies on CPU only.
    """

    def __init__(self, source: nn.SyncBatchNorm, ledger: CommunicationLedger) -> None:
        super().__init__(source.num_features, source.eps, source.momentum, source.affine, source.track_running_stats)
        self.weight, self.bias = source.weight, source.bias
        self.running_mean, self.running_var = source.running_mean, source.running_var
        self.num_batches_tracked = source.num_batches_tracked
        self.training = source.training
        self.ledger, self.group = ledger, source.process_group
        self.world_size = dist.get_world_size(self.group) if dist.is_initialized() else 1

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions (N, C, ...); got shape {tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.world_size == 1:
            return super().forward(input)
        self._check_input_dim(input)
        channels, dims = input.shape[1], [0, *range(2, input.dim())]
        x = input.double()
        count = x.new_full((1,), input.numel() // channels)
        local = torch.cat([x.sum(dims), x.square().sum(dims), count])
        stats = AllReduceSum.apply(local, self.ledger, self.world_size, "batchnorm", self.group)
        total = stats[-1]
        mean = stats[:channels] / total
        var = (stats[channels:-1] / total - mean.square()).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_((var * total / (total - 1)).to(self.running_var.dtype), factor)
        shape = [1, channels] + [1] * (input.dim() - 2)
        out = ((x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)).to(input.dtype)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def replace_sync_batchnorm(module: nn.Module, ledger: CommunicationLedger) -> nn.Module:
    """Swap every ``nn.SyncBatchNorm`` in ``module`` (in place) for a :class:`GlooSyncBatchNorm` over the same
    process group (the group is chosen once, where the layer sync converts the batch norms)."""
    if isinstance(module, nn.SyncBatchNorm):
        return GlooSyncBatchNorm(module, ledger)
    for name, child in module.named_children():
        module.add_module(name, replace_sync_batchnorm(child, ledger))
    return module


class GroupSyncBatchNorm(TorchSyncBatchNorm):
    """Lightning's ``sync_batchnorm`` conversion, over one process group instead of the whole world."""

    def __init__(self, group: Optional[dist.ProcessGroup]) -> None:
        self.group = group

    def apply(self, model: nn.Module) -> nn.Module:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=self.group)
