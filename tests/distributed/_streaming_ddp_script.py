"""Run by test_streaming_ddp.py: 2-process DDP (gloo, CPU) over a streaming DataModule; each rank saves the raw
uint8 batches it trained and validated on, its statistics and the loader Lightning used."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from traincraft.data import StreamingImageDataModule
from traincraft.modules.classifier import ImageClassifier


def main(out: Path, train_dir: str, val_dir: str) -> None:
    pl.seed_everything(0)
    data = StreamingImageDataModule(train_dir, val_dir=val_dir, batch_size=4, eval_batch_size=2, seed=11,
                                    augment="none")
    seen: dict[str, list] = {"train": [], "val": []}
    transfer = data.on_before_batch_transfer

    def record(batch, dataloader_idx):
        stage = "train" if data.trainer.training else "val"
        if not data.trainer.sanity_checking:
            seen[stage].append((data.trainer.current_epoch, batch[0].clone(), batch[1].clone()))
        return transfer(batch, dataloader_idx)

    data.on_before_batch_transfer = record
    model = ImageClassifier("mlp", num_classes=data.num_classes, in_channels=data.in_channels,
                            input_size=data.image_size)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=data)
    torch.save({"seen": seen, "mean": data.mean, "std": data.std, "count": data.statistics["count"],
                "loader": type(trainer.train_dataloader).__name__,
                "sampler": type(trainer.train_dataloader.sampler).__name__},
               out / f"rank{trainer.global_rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank done with its collectives before gloo is torn down
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
