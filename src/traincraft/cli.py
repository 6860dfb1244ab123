"""``traincraft`` console script: LightningCLI with traincraft's default recipe, loggers and checkpoints."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback

from traincraft.checkpoint import verify_checkpoint
from traincraft.data import ImageDataModule
from traincraft.modules import ImageClassifier

#: The default recipe of ``traincraft fit``: a ConvNet on the scikit-learn digits (no download).
DEFAULTS: dict[str, Any] = {
    "model": {
        "class_path": "traincraft.modules.ImageClassifier",
        "init_args": {
            "model": "convnet",
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003, "weight_decay": 0.0005}},
            "scheduler": {"class_path": "torch.optim.lr_scheduler.CosineAnnealingLR", "init_args": {"T_max": 15}},
            "label_smoothing": 0.05,
        },
    },
    "data": {"class_path": "traincraft.data.DigitsDataModule", "init_args": {"batch_size": 64}},
    "trainer.max_epochs": 15,
    "trainer.default_root_dir": "runs",
    "trainer.log_every_n_steps": 10,
    "trainer.plugins": [{"class_path": "traincraft.checkpoint.SafeCheckpointIO"}],  # crash-safe, verified
    "trainer.logger": [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "csv"}},
        {"class_path": "traincraft.loggers.WandbLogger", "init_args": {"save_dir": "runs", "project": "traincraft"}},
    ],
    "checkpoint.dirpath": "runs/checkpoints",
    "checkpoint.monitor": "val/acc",
    "checkpoint.mode": "max",
    "checkpoint.save_last": True,
    "checkpoint.save_top_k": 1,
    "checkpoint.filename": "best-epoch{epoch:02d}-acc{val/acc:.4f}",
    "checkpoint.auto_insert_metric_name": False,
}


class _SaveAndLogConfig(SaveConfigCallback):
    """Writes ``config.yaml`` to the run directory and sends the whole configuration to every logger."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        config = self.parser.dump(self.config, skip_none=False, format="json")
        for logger in trainer.loggers:
            logger.log_hyperparams({"cli_config": config})


class TraincraftCLI(LightningCLI):
    """LightningCLI for traincraft: ``fit``, ``validate``, ``test`` and ``predict`` with the default recipe.

    The model is an :class:`~traincraft.modules.ImageClassifier` (or subclass) and the data any
    :class:`~traincraft.data.ImageDataModule`; the data's ``num_classes``, ``in_channels`` and ``image_size`` are
    linked into the model (``model_input_size``: the size after any crop of the augmentation). Defaults: :data:`DEFAULTS` (W&B, offline without credentials, plus CSV; best and last
    checkpoints in ``runs/checkpoints``, so ``fit --ckpt_path last`` resumes).
    """

    def __init__(self, args: ArgsType = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_callback", _SaveAndLogConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_kwargs", {"parser_mode": "yaml"})
        super().__init__(
            ImageClassifier,
            ImageDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            **kwargs,
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        super().parse_arguments(parser, args)
        ckpt_path = self.config.get(str(self.config.get("subcommand")), {}).get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():  # before LightningCLI torch.loads it for hyperparameters
            verify_checkpoint(ckpt_path)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(DEFAULTS)
        for source, target in (("num_classes", "num_classes"), ("in_channels", "in_channels"), ("model_input_size", "input_size")):
            parser.link_arguments(f"data.{source}", f"model.init_args.{target}", apply_on="instantiate")


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def main(args: Optional[ArgsType] = None) -> None:
    """Entry point of the ``traincraft`` console script.

    Configuration errors found while building the model, data or trainer (an unknown model name, a
    ``num_classes`` that does not match the data, ...) end the program with their own message and exit status 2
    instead of jsonargparse's nested traceback.
    """
    try:
        TraincraftCLI(args=args)
        # Under DDP on gloo an undestroyed process group can abort the process at interpreter shutdown.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank done with its collectives before gloo is torn down
            torch.distributed.destroy_process_group()
    except (ValueError, TypeError) as error:
        print(f"traincraft: error: {_root_cause(error)}", file=sys.stderr)
        raise SystemExit(2) from error


if __name__ == "__main__":
    main()
