"""Run by test_gradient_clipping_fsdp.py: 2 processes (gloo, CPU) whose parameters are sharded by torch's
``fully_shard`` (DTensor, FSDP2); both ranks see the same batches, so the reduced gradients equal those of one
process, and GradientClipping must clip by the norm of the whole parameters, not of each rank's shard."""

import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.fsdp import fully_shard

from traincraft.callbacks.gradient_clipping import GradientClipping

CONFIGS = {  # name: (GradientClipping kwargs, batch to poison with NaN or None)
    "norm": (dict(mode="norm", threshold=0.5, log_layer_norms=True, skip_method="snapshot"), 3),
    "layer_inf": (dict(mode="norm", threshold=0.05, per_layer=True, norm_type=math.inf, skip_method="sync"), 2),
}


class Net(pl.LightningModule):
    """Odd layer widths, so the shards of a parameter differ in size (15 rows: 8 + 7)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 15), torch.nn.BatchNorm1d(15), torch.nn.Tanh(),
                                       torch.nn.Linear(15, 5))

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1]) * 50

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        data = torch.utils.data.TensorDataset(torch.randn(96, 6, generator=g), torch.randn(96, 5, generator=g))
        return torch.utils.data.DataLoader(data, batch_size=16)


class FullyShard(DDPStrategy):
    """DDP's processes and launcher, with FSDP2's sharding in place of the DDP wrapper (Lightning's own FSDP
    strategies refuse CPU accelerators); the optimizer is created after, over the DTensor parameters."""

    def configure_ddp(self) -> None:
        for layer in self.model.net:
            if any(True for _ in layer.parameters()):
                fully_shard(layer)
        fully_shard(self.model.net)


class Poison(Callback):
    def __init__(self, batch):
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.batch:
            batch[0][0, 0] = math.nan


class Record(Callback):
    """Whole (gathered) gradients after clipping, the logged norms, whole parameters and buffers per batch."""

    def __init__(self):
        self.grads, self.logged, self.params, self.buffers = [], [], [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: _whole(p.grad) for n, p in pl_module.named_parameters() if p.grad is not None})

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.logged.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("grad/")})
        self.params.append({n: _whole(p.detach()) for n, p in pl_module.named_parameters()})
        self.buffers.append({n: b.clone() for n, b in pl_module.named_buffers()})


def _whole(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t.clone()


def fit(model, strategy, devices, config):
    kwargs, bad = CONFIGS[config]
    record = Record()
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=5, logger=False,
                         log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False,
                         callbacks=[Poison(bad), GradientClipping(**kwargs), record])
    trainer.fit(model)
    sharded = [type(p).__name__ for p in model.parameters()]
    return {"grads": record.grads, "logged": record.logged, "params": record.params, "buffers": record.buffers,
            "types": sharded}


def main(out: Path, config: str) -> None:
    result = fit(Net(), FullyShard(process_group_backend="gloo"), 2, config)
    torch.save(result, out / f"rank{dist.get_rank()}_{config}.pt")
    if dist.is_initialized():
        dist.barrier()  # every rank done with its collectives before gloo is torn down
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
