"""Run by test_column_parallel_dist.py: column-parallel training (gloo, CPU) on 2 processes or the 2x2 hybrid on 4.

Saves, per rank, what the test compares with single-process references: the batches seen, per-step losses and
weights, the strategy's byte ledger, memory, gradient norms over the column group, eval outputs, and the state of
resumed and AMP runs; on 4 processes also a run with batch norms and Trainer(sync_batchnorm=True).
"""

import functools
import os
import sys
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from tests.helpers import count_host_syncs
from traincraft.data import DigitsDataModule
from traincraft.modules import ImageClassifier
from traincraft.strategies.column_parallel import ColumnParallelStrategy

MODEL = dict(model="alexnet_two_column", num_classes=10, in_channels=1, input_size=16,
             model_kwargs=dict(width=0.25, dropout=0.0))
SGD = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
# a rank that dies must fail the others quickly, not after the default 30 minutes
TIMEOUT = timedelta(seconds=120)
CLIP = 5.0


class Record(Callback):
    """Batches, losses, column-group gradient norms and weights after every step; host syncs per step."""

    def __init__(self, syncs: dict, enabled: list):
        self.images, self.labels, self.losses, self.weights, self.norms = [], [], [], [], []
        self.syncs, self.enabled, self.quiet_syncs = syncs, enabled, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.images.append(batch[0].clone())
        self.labels.append(batch[1].clone())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # the norm of the whole model's gradient: squared norms summed over the column group
        local = sum(p.grad.double().pow(2).sum() for p in pl_module.parameters() if p.grad is not None)
        torch.distributed.all_reduce(local, group=trainer.strategy.gradient_norm_group)
        self.norms.append(local.sqrt())

    def count_from_transfer(self, data):
        # host syncs are counted from the batch's transfer (augmentation on the device) to the end of its step
        transfer = data.on_after_batch_transfer

        def counted(batch, idx):
            if data.trainer.training:
                self.syncs.clear()
                self.enabled[0] = True
            return transfer(batch, idx)

        data.on_after_batch_transfer = counted

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.enabled[0] = False
        self.quiet_syncs[trainer.global_step] = dict(self.syncs)
        self.losses.append(outputs["loss"].detach().clone())
        self.weights.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})


def with_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """A TwoColumnAlexNet (full or one column) with BatchNorm2d in place of the first LRN of each column."""
    for column in model.columns.values():
        column.norm1 = torch.nn.BatchNorm2d(column.conv1.out_channels)
    return model


def fit(out: Path, max_epochs: int, batch: int, *, strategy=None, ckpt_path=None, precision="32-true", logger=False,
        callbacks=(), init_seed=None, data_hook=None, checkpoint_dir=None, batchnorm=False):
    pl.seed_everything(0)
    if init_seed is not None:
        torch.manual_seed(init_seed)  # different initial weights: init_weights must replace them
    clf = ImageClassifier(**MODEL, optimizer=SGD)
    if batchnorm:
        with_batchnorm(clf.model)
    data = DigitsDataModule(image_size=16, batch_size=batch)
    if data_hook is not None:
        data_hook(data)
    callbacks = list(callbacks)
    if checkpoint_dir is not None:  # Lightning's own checkpointing: top-k removal, last, resume from "last"
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, monitor="val/loss", save_top_k=1, save_last=True))
    trainer = pl.Trainer(
        accelerator="cpu", devices=int(os.environ["TEST_WORLD"]), strategy=strategy or ColumnParallelStrategy(timeout=TIMEOUT),
        max_epochs=max_epochs, limit_train_batches=3, limit_val_batches=2, num_sanity_val_steps=0,
        logger=logger, log_every_n_steps=2, enable_checkpointing=checkpoint_dir is not None, enable_progress_bar=False,
        enable_model_summary=False, precision=precision, callbacks=callbacks, deterministic=True,
        sync_batchnorm=batchnorm,
    )
    trainer.fit(clf, datamodule=data, ckpt_path=ckpt_path)
    return clf, trainer


def main(out: Path) -> None:
    world = int(os.environ["TEST_WORLD"])
    if "LOCAL_RANK" not in os.environ:  # the launching process, before it becomes rank 0: the full initial model
        pl.seed_everything(0)
        torch.save(ImageClassifier(**MODEL).model.state_dict(), out / "init_full.pt")
    batch = 16 if world == 2 else 8
    syncs, enabled = {}, [False]
    record = Record(syncs, enabled)
    with count_host_syncs(syncs, enabled):
        clf, trainer = fit(out, 2, batch, strategy=ColumnParallelStrategy(timeout=TIMEOUT), callbacks=[record],
                           logger=CSVLogger(str(out), name="logs", version=0), data_hook=record.count_from_transfer)
    enabled[0] = False
    strategy = trainer.strategy
    rank = trainer.global_rank
    result = {
        "images": record.images, "labels": record.labels, "losses": record.losses, "weights": record.weights,
        "norms": record.norms, "quiet_syncs": record.quiet_syncs, "ledger": strategy.ledger.last_step(),
        "ledger_steps": strategy.ledger.steps, "ledger_state": strategy.ledger.state_dict(), "column": strategy.column, "data_rank": strategy.data_parallel_rank,
        "param_bytes": sum(p.numel() * p.element_size() for p in clf.parameters()),
        "optimizer_bytes": sum(t.numel() * t.element_size() for s in trainer.optimizers[0].state.values()
                               for t in s.values() if isinstance(t, torch.Tensor)),
        "val_acc": float(trainer.callback_metrics["val/acc"]),
    }
    if world == 2:
        # resume: 3 steps from a full state dict with other initial weights, checkpointed by ModelCheckpoint, then 3
        # more from its last checkpoint
        strategy = ColumnParallelStrategy(init_weights=str(out / "init_full.pt"), timeout=TIMEOUT)
        fit(out, 1, batch, strategy=strategy, init_seed=999, checkpoint_dir=out / "ckpts")
        resumed, second = fit(out, 2, batch, ckpt_path=str(out / "ckpts" / "last.ckpt"))
        result["resumed"] = {k: v.clone() for k, v in resumed.model.state_dict().items()}
        result["resumed_ledger"] = second.strategy.ledger.state_dict()
        second.save_checkpoint(out / "final")
        resumed.eval()
        with torch.no_grad():  # a collective forward: every rank runs it
            result["eval_logits"] = resumed(torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(3)))
        # traincraft's GradientClipping clips both columns by the norm of the whole model
        from traincraft.callbacks.gradient_clipping import GradientClipping

        clipped = Record({}, [False])
        fit(out, 1, batch, callbacks=[clipped, GradientClipping(mode="norm", threshold=CLIP)])
        result["clipped"] = {"weights": clipped.weights, "norms": clipped.norms}
        amp = Record({}, [False])
        fit(out, 1, batch, precision="bf16-mixed", callbacks=[amp])
        result["amp"] = {"losses": amp.losses, "weights": amp.weights, "images": amp.images}
    if world == 4:
        # the batch statistics of a column must come from its two replicas (its data-parallel group)
        bn = Record({}, [False])
        bn_clf, bn_trainer = fit(out, 1, batch, callbacks=[bn], batchnorm=True)
        norms = [m for m in bn_clf.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        result["batchnorm"] = {"weights": bn.weights, "images": bn.images, "labels": bn.labels,
                               "types": [type(m).__name__ for m in norms],
                               "ledger": bn_trainer.strategy.ledger.last_step()}
    torch.save(result, out / f"rank{rank}.pt")
    # tear gloo down before exit: otherwise the process may abort at interpreter shutdown
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank done with its collectives before gloo is torn down
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
