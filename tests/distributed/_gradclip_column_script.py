"""Run by test_gradient_clipping_ddp.py: 2 processes (gloo, CPU), each holding HALF of a model's trainable
parameters, as column-parallel ranks do; the strategy names the group for the global gradient norm."""

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy

from traincraft.callbacks.gradient_clipping import GradientClipping

SPLIT = 3  # rank 0 trains parameters [0, 3), rank 1 the rest


class Net(pl.LightningModule):
    """A small tanh MLP; ``rank`` is None in the single-process reference, which trains every parameter."""

    def __init__(self, rank=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16),
                                       torch.nn.Tanh(), torch.nn.Linear(16, 4))
        if rank is not None:
            for i, p in enumerate(self.net.parameters()):
                p.requires_grad_((i < SPLIT) == (rank == 0))

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1]) * 50

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05, momentum=0.9)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        data = torch.utils.data.TensorDataset(torch.randn(96, 8, generator=g), torch.randn(96, 4, generator=g))
        return torch.utils.data.DataLoader(data, batch_size=16)


class ColumnLikeStrategy(DDPStrategy):
    """Processes without DDP's gradient averaging (each rank owns its parameters) plus the norm group."""

    def configure_ddp(self) -> None:
        pass

    @property
    def gradient_norm_group(self):
        return dist.group.WORLD


class Record(Callback):
    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})


class ShareWeights(Callback):
    """After each step every rank receives the parameters the other rank owns, so both run the whole forward with
    current weights (what the column exchange does for activations); gradients stay with their owner."""

    def on_train_batch_end(self, trainer, pl_module, *args):
        for i, p in enumerate(pl_module.net.parameters()):
            dist.broadcast(p.data, src=0 if i < SPLIT else 1)


def fit(model, strategy, devices, mode):
    record = Record()
    clip = GradientClipping(mode=mode, threshold=0.5, history_size=4, quantile=0.5)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=6, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, callbacks=[clip, record, ShareWeights()])
    trainer.fit(model)
    return {"grads": record.grads, "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
            "state": clip.state_dict()}


def main(out: Path, mode: str) -> None:
    # One fit per launch: a second fit in the same processes sometimes aborted them at interpreter exit.
    model = Net(rank=int(os.environ.get("LOCAL_RANK", 0)))
    result = fit(model, ColumnLikeStrategy(process_group_backend="gloo"), 2, mode)
    torch.save(result, out / f"rank{dist.get_rank()}_{mode}.pt")
    # tear gloo down before exit: otherwise the process may abort at interpreter shutdown
    if dist.is_initialized():
        dist.barrier()  # every rank done with its collectives before gloo is torn down
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
