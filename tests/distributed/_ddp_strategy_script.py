"""Run by test_data_parallel_ddp.py under ``torchrun --nproc_per_node 2``: several 2-process (gloo, CPU) fits
with DataParallelStrategy in one launch; each rank saves what the test compares with single-process references.

Runs: ``exact`` (fp32, CSV logger), ``fp16``, ``bf16``, ``powersgd`` (rank 1), ``accumulate`` (2 micro-batches
per step), all with ``sync_batchnorm=True``; ``noise`` (logistic regression, lr 0, many steps, host syncs
counted, a straggler on rank 1: no SyncBatchNorm there, whose collectives would make rank 0 wait in the forward).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tests.helpers import count_host_syncs
from traincraft.strategies.data_parallel import DataParallelStrategy

MICRO = 8  # examples per rank and micro-batch


class ConvNet(nn.Module):
    """Conv, batch norm, ReLU, linear; DDP broadcasts rank 0's buffers (``scale`` and the BN statistics) every
    step. Trained with ``sync_batchnorm=True``, the BN layer normalizes with the global batch's statistics."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 8 * 8, 10)
        )
        self.register_buffer("scale", torch.full((5,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x * self.scale[0])


def conv_net() -> nn.Module:
    return ConvNet()


def conv_data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def logistic_data(n: int = 4096, dim: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(n, dim, generator=generator)
    w = torch.linspace(-1.0, 1.0, dim)
    y = (torch.rand(n, generator=generator) < torch.sigmoid(x @ w + 0.3)).long()
    return x, y


def logistic_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Linear(6, 2)


class Shard(Dataset):
    """Rank r's micro-batch k is examples [(k·world + r)·MICRO, +MICRO): the global micro-batch k is their
    concatenation over ranks in rank order, which is what the single-process reference trains on."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, rank: int, world: int, micro: int) -> None:
        index = torch.arange(len(x)).reshape(-1, world, micro)[:, rank].reshape(-1)
        self.x, self.y = x[index], y[index]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class SyncWindow(pl.Callback):
    """Counts host syncs from each batch's start to its end (the strategy's monitor runs after this callback)."""

    def __init__(self) -> None:
        self.counts: dict[int, dict[str, int]] = {}
        self.current: dict[str, int] = {}
        self.enabled = [False]

    def on_train_batch_start(self, *args) -> None:
        self.current.clear()
        self.enabled[0] = True

    def on_train_batch_end(self, trainer, *args) -> None:
        self.enabled[0] = False
        self.counts[trainer.global_step] = dict(self.current)


class Module(pl.LightningModule):
    def __init__(self, net: nn.Module, lr: float, sleep_rank: int = -1) -> None:
        super().__init__()
        self.net, self.lr, self.sleep_rank = net, lr, sleep_rank
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.global_rank == self.sleep_rank:
            time.sleep(0.005)  # a straggler: slower before its gradients are ready
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.losses.append(loss.detach().clone())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def fit(name: str, out: Path, net: nn.Module, data, strategy: DataParallelStrategy, steps: int, **kwargs) -> dict:
    x, y = data
    accumulate = kwargs.pop("accumulate_grad_batches", 1)
    lr = kwargs.pop("lr", 0.1)
    module = Module(net, lr=lr, sleep_rank=kwargs.pop("sleep_rank", -1))
    shuffle = kwargs.pop("shuffle", False)
    generator = torch.Generator().manual_seed(10 + strategy_rank())  # each rank reshuffles its own shard
    loader = DataLoader(Shard(x, y, strategy_rank(), 2, MICRO), batch_size=MICRO, shuffle=shuffle, generator=generator)
    trainer = pl.Trainer(
        accelerator="cpu", devices=local_world(), num_nodes=2 // local_world(), strategy=strategy, max_steps=steps,
        accumulate_grad_batches=accumulate, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, use_distributed_sampler=False, **{"logger": False, "log_every_n_steps": steps, **kwargs},
    )
    window = next((c for c in trainer.callbacks if isinstance(c, SyncWindow)), None)
    if window is None:
        trainer.fit(module, loader)
    else:
        with count_host_syncs(window.current, window.enabled):
            trainer.fit(module, loader)
    return {
        "sync_counts": window.counts if window is not None else None,
        "losses": torch.stack(module.losses),
        "state": {k: v.clone() for k, v in module.net.state_dict().items()},
        "metrics": strategy.metrics,
        "last_step": {"/".join(k): v for k, v in strategy.ledger.last_step().items()},
        "ledger_steps": strategy.ledger.steps,
        "total_payload": strategy.ledger.total_payload,
        "batchnorm": [type(m).__name__ for m in module.net.modules() if "Norm" in type(m).__name__],
        "callback_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
    }


def strategy_rank() -> int:
    return int(os.environ["RANK"])


def local_world() -> int:
    return int(os.environ["LOCAL_WORLD_SIZE"])


def nodes(out: Path) -> None:
    """One process per node (``torchrun --nnodes 2 --nproc_per_node 1``), strategy chosen by its string name."""
    from lightning.pytorch.strategies import StrategyRegistry

    from traincraft.strategies._registry import register_strategies

    register_strategies(StrategyRegistry)
    module = Module(conv_net(), lr=0.1)
    x, y = conv_data(2 * MICRO * 2 * 5)  # the same examples as main() and the test's reference
    loader = DataLoader(Shard(x, y, strategy_rank(), 2, MICRO), batch_size=MICRO)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, num_nodes=2, strategy="traincraft_ddp_fp16", max_steps=3, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=3,
        use_distributed_sampler=False, sync_batchnorm=True,
    )
    trainer.fit(module, loader)
    strategy = trainer.strategy
    torch.save(
        {
            "strategy": type(strategy).__name__,
            "compression": strategy.compression,
            "environment": type(strategy.cluster_environment).__name__,
            "global_rank": trainer.global_rank,
            "node_rank": trainer.node_rank,
            "world_size": trainer.world_size,
            "state": {k: v.clone() for k, v in module.net.state_dict().items()},
            "metrics": strategy.metrics,
        },
        out / f"node{trainer.node_rank}.pt",
    )
    torch.distributed.barrier()  # every rank done with its collectives before gloo is torn down
    torch.distributed.destroy_process_group()


def main(out: Path) -> None:
    rank = strategy_rank()
    results = {}
    conv = conv_data(2 * MICRO * 2 * 5)
    results["exact"] = fit(
        "exact", out, conv_net(), conv, DataParallelStrategy(), steps=5, sync_batchnorm=True,
        logger=CSVLogger(out, name="csv", version=0),
    )
    for compression in ("fp16", "bf16"):
        results[compression] = fit(
            compression, out, conv_net(), conv, DataParallelStrategy(compression=compression), steps=5,
            sync_batchnorm=True,
        )
    results["powersgd"] = fit(
        "powersgd", out, conv_net(), conv, DataParallelStrategy(compression="powersgd", powersgd_rank=1),
        steps=5, sync_batchnorm=True,
    )
    results["accumulate"] = fit(
        "accumulate", out, conv_net(), conv, DataParallelStrategy(), steps=3, sync_batchnorm=True,
        accumulate_grad_batches=2,
    )
    results["noise"] = fit(
        "noise", out, logistic_net(), logistic_data(), DataParallelStrategy(), steps=512, lr=0.0, shuffle=True,
        callbacks=[SyncWindow()], sleep_rank=1,
    )
    torch.save(results, out / f"rank{rank}.pt")
    # tear gloo down before exit: otherwise the process may abort at interpreter shutdown
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank done with its collectives before gloo is torn down
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    (nodes if sys.argv[2:] == ["nodes"] else main)(Path(sys.argv[1]))
