"""Run by test_data_drift_ddp.py: DataDriftMonitor under DDP (gloo, CPU) or in one process; rank 0 saves the
gathered samples and the logged drift metrics."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from traincraft.callbacks.data_drift import DataDriftMonitor
from traincraft.data import DigitsDataModule
from traincraft.modules import ImageClassifier


def main(out: Path, devices: int) -> None:
    pl.seed_everything(0)
    # lr = 0 and no BatchNorm: the weights stay at their (seeded) initialization in both runs, so the features
    # differ only through which process computes them
    model = ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=8,
                            model_kwargs={"hidden": [32], "norm": "none"},
                            optimizer=lambda params: torch.optim.SGD(params, lr=0.0))
    monitor = DataDriftMonitor(max_samples=200, mmd="always", num_permutations=300)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=2,
        val_check_interval=2, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor],
    )
    trainer.fit(model, datamodule=DigitsDataModule(image_size=8, batch_size=32))
    if trainer.global_rank == 0:
        metrics = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("drift/")}
        torch.save({"reference": monitor.reference_sample, "current": monitor.current_sample, "metrics": metrics,
                    "ks": torch.from_numpy(monitor.last["ks"].statistic)}, out / f"devices{devices}.pt")
    # tear gloo down before exit: otherwise the process may abort at interpreter shutdown
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank done with its collectives before gloo is torn down
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
