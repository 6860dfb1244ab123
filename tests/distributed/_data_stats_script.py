"""Run by test_data_stats_ddp.py: 2-process DDP (gloo, CPU); each rank saves its statistics and its own share."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

import traincraft.data._statistics_pass as statistics_pass
from traincraft.data.digits import DigitsDataModule
from traincraft.modules.classifier import ImageClassifier

local_counts = []
_moment_sums = statistics_pass.moment_sums


def recording_moment_sums(*args, **kwargs):
    sums = _moment_sums(*args, **kwargs)
    local_counts.append(sums["count"].item())  # before the all-reduce: this rank's share
    return sums


def main(out: Path) -> None:
    statistics_pass.moment_sums = recording_moment_sums
    pl.seed_everything(0)
    data = DigitsDataModule(image_size=8, batch_size=32, whitening="zca")
    model = ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=8)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=1, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    torch.save({"mean": data.mean, "std": data.std, "local_counts": local_counts, **data.statistics},
               out / f"rank{trainer.global_rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank done with its collectives before gloo is torn down
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
