"""Run by test_hard_example_ddp.py: 2-process DDP (gloo, CPU) training with HardExampleMining; every rank saves
what it drew, the per-example losses it produced and its sampler's final state."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from traincraft.callbacks import HardExampleMining
from traincraft.data import DigitsDataModule
from traincraft.modules import ImageClassifier

BATCH = 32


class Record(Callback):
    def __init__(self, mining: HardExampleMining, out: Path):
        self.mining, self.out, self.epochs = mining, out, []

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs.append({"probabilities": self.mining.sampler.probabilities.clone(), "indices": [], "losses": []})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sampler, record = self.mining.sampler, self.epochs[-1]
        if batch_idx == 0:
            record["draw"], record["rank_indices"] = sampler.epoch_draw().clone(), sampler.indices.clone()
        indices = sampler.indices[batch_idx * BATCH : (batch_idx + 1) * BATCH]
        assert torch.equal(batch[1], trainer.datamodule.datasets["train"].labels[indices])  # the batch holds them
        record["indices"].append(indices.clone())
        record["losses"].append(outputs["per_example_loss"].detach().clone())

    def on_train_end(self, trainer, pl_module):
        sampler = self.mining.sampler
        torch.save({"epochs": self.epochs, "loss_ema": sampler.loss_ema, "seen": sampler.seen,
                    "probabilities": sampler.probabilities, "num_replicas": sampler.num_replicas, "rank": sampler.rank,
                    "metrics": {k: v.item() for k, v in trainer.callback_metrics.items()}},
                   self.out / f"rank{trainer.global_rank}.pt")


def main(out: Path) -> None:
    pl.seed_everything(0)
    mining = HardExampleMining(decay=0.5, cap=4.0, uniform_mix=0.2)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=3, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[mining, Record(mining, out)],
    )
    model = ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=8, model_kwargs={"hidden": [16]},
                            optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9))
    trainer.fit(model, datamodule=DigitsDataModule(image_size=8, batch_size=BATCH, augment="none"))
    # tear gloo down before exit: otherwise the process may abort at interpreter shutdown
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank done with its collectives before gloo is torn down
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
