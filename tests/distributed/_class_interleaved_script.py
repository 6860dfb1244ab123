"""Run by test_class_interleaved_ddp.py: 2-process DDP (gloo, CPU) training on digits with
sampler="class_interleaved"; every rank saves its sampler's placement, the plan it computes for both ranks, and the
labels of the batches it trained on."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from traincraft.data import DigitsDataModule
from traincraft.modules import ImageClassifier


class Record(Callback):
    def __init__(self, out: Path):
        self.out, self.epochs = out, []

    def on_train_epoch_start(self, trainer, pl_module):
        sampler = trainer.train_dataloader.sampler
        self.epochs.append({"plan": [sampler.epoch_order(trainer.current_epoch, r) for r in range(2)], "labels": []})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.epochs[-1]["labels"].append(batch[1].clone())

    def on_train_end(self, trainer, pl_module):
        sampler = trainer.train_dataloader.sampler
        torch.save({"type": type(sampler).__name__, "num_replicas": sampler.num_replicas, "rank": sampler.rank,
                    "epochs": self.epochs, "all_labels": trainer.datamodule.datasets["train"].labels},
                   self.out / f"rank{trainer.global_rank}.pt")


def main(out: Path) -> None:
    pl.seed_everything(0)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[Record(out)],
    )
    model = ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=8, model_kwargs={"hidden": [16]},
                            optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    data = DigitsDataModule(image_size=8, batch_size=32, augment="none", sampler="class_interleaved")
    trainer.fit(model, datamodule=data)
    if torch.distributed.is_initialized():  # tear gloo down before exit: otherwise the process may abort at shutdown
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
