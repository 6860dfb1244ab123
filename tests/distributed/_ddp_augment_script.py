"""Run by test_ddp_data.py: 2-process DDP (gloo, CPU) training that saves what each rank saw."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from traincraft.data import DigitsDataModule
from traincraft.modules import ImageClassifier


class Record(Callback):
    def __init__(self, out: Path):
        self.out, self.batches, self.labels = out, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch[0].clone())
        self.labels.append(batch[1].clone())

    def on_train_end(self, trainer, pl_module):
        torch.save(
            {"images": self.batches, "labels": self.labels, "mean": trainer.datamodule.mean},
            self.out / f"rank{trainer.global_rank}.pt",
        )


def main(out: Path, seed: int, split: bool) -> None:
    pl.seed_everything(seed)
    data = DigitsDataModule(image_size=16, batch_size=32)
    model = ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=16)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=3, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[Record(out)],
        use_distributed_sampler=split,
    )
    trainer.fit(model, datamodule=data)
    # tear gloo down before exit: otherwise the process may abort at interpreter shutdown
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank done with its collectives before gloo is torn down
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "split")
