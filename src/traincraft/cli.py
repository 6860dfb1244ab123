"""``traincraft`` console script: LightningCLI with traincraft's default recipe, loggers and checkpoints.

Every error a user can cause (a bad option or file, a value the data contradicts, a checkpoint of another model,
a directory that cannot be written, a trainer argument Lightning refuses) ends the program with one message and
exit status 2, before training. ``--debug`` (anywhere on the command line) or ``TRAINCRAFT_DEBUG=1`` lets every
exception propagate with its traceback instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import (
    ArgsType,
    LightningArgumentParser,
    LightningCLI,
    SaveConfigCallback,
    instantiate_class,
)

# The parts live in traincraft._cli; the public names are imported here, where they have always been.
from traincraft._cli.checks import _LOAD_FLAG, LINKS, _InstantiationChecks, check_checkpoint_model  # noqa: F401
from traincraft._cli.errors import _debugging, _fail, _UserError
from traincraft._cli.recipes import print_recipes, recipe_path, recipes, resolve_recipe_args  # noqa: F401
from traincraft._cli.report import report_main
from traincraft.checkpoint import verify_checkpoint
from traincraft.data import ImageDataModule
from traincraft.modules import ImageClassifier

#: The monitors and the guard that the default recipe and the shipped recipes turn on: what traincraft adds to a
#: fit. Their signals reach every logger (W&B also gets histograms and image grids) and, at the end of the fit,
#: the health report (docs/health-report.md). docs/benchmarks.md measures their cost on the default recipe.
MONITORS: list[dict[str, Any]] = [
    # a guard against cliffs: clips rare spikes, skips non-finite steps; per-layer norms give the depth profile
    {"class_path": "traincraft.callbacks.GradientClipping",
     "init_args": {"mode": "norm", "threshold": 5.0, "log_layer_norms": True, "log_depth_profile": True}},
    {"class_path": "traincraft.callbacks.LearningRateMonitor",
     "init_args": {"logging_interval": "step", "log_update_ratio": True, "log_oscillation": True}},
    {"class_path": "traincraft.callbacks.CovariateShiftMonitor"},
    {"class_path": "traincraft.callbacks.DataDriftMonitor"},
    {"class_path": "traincraft.callbacks.AugmentationGallery"},
    {"class_path": "traincraft.callbacks.HealthReport"},
]

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
    "trainer.callbacks": MONITORS,
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


class TraincraftCLI(_InstantiationChecks, LightningCLI):
    """LightningCLI for traincraft: ``fit``, ``validate``, ``test`` and ``predict`` with the default recipe.

    The model is an :class:`~traincraft.modules.ImageClassifier` (or subclass) and the data any
    :class:`~traincraft.data.ImageDataModule`; the data's ``num_classes``, ``in_channels`` and ``model_input_size``
    (the size after any crop of the augmentation) are linked into the model's ``num_classes``, ``in_channels`` and
    ``input_size``: setting one of those to a different value is an error. Defaults: :data:`DEFAULTS` (W&B, offline
    without credentials, plus CSV; best and last checkpoints in ``runs/checkpoints``, so ``fit --ckpt_path last``
    resumes).

    ``--ckpt_path`` loads weights into the configured model; a checkpoint saved from another model (another
    architecture, ``model_kwargs``, number of classes...) is refused unless ``--load_model_from_checkpoint=true``,
    which builds the checkpoint's model from its saved hyperparameters (Lightning's own behaviour).
    Directories the run writes (``trainer.default_root_dir``, each logger's ``save_dir``, checkpoint directories)
    are checked before anything runs.
    """

    def __init__(self, args: ArgsType = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_callback", _SaveAndLogConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        # exit_on_error=False: parse errors reach main() as ArgumentError, printed without jsonargparse's usage dump
        kwargs.setdefault("parser_kwargs", {
            "parser_mode": "yaml",
            "exit_on_error": False,
            "allow_abbrev": False,  # a misspelled option is an error, not the option it prefixes
            "description": "traincraft: fit, validate, test or predict with traincraft's recipe (docs/getting-started.md). "
            "--config takes a YAML file or a shipped recipe's name (`traincraft recipes` lists them). "
            "`traincraft report RUN` writes the health report of a run and prints its diagnoses "
            "(`traincraft report --help`). "
            "Errors print one line (exit status 2); add --debug or set TRAINCRAFT_DEBUG=1 for tracebacks.",
        })
        self._checkpoint_hparams_loaded = False
        if args is None:  # LightningCLI reads sys.argv itself
            sys.argv[1:] = resolve_recipe_args(sys.argv[1:])
        elif isinstance(args, (list, tuple)):
            args = resolve_recipe_args([str(arg) for arg in args])
        super().__init__(
            ImageClassifier,
            ImageDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_argument(
            f"--{_LOAD_FLAG}",
            type=bool,
            default=False,
            help="Build the model from the hyperparameters saved in --ckpt_path (a file) instead of the configuration. "
            "Without it a checkpoint of another model is refused.",
        )
        parser.set_defaults(DEFAULTS)
        for source, target, _ in LINKS:
            parser.link_arguments(f"data.{source}", f"model.init_args.{target}", apply_on="instantiate")

    def _subcommand_config(self) -> Any:
        return self.config.get(str(self.config.get("subcommand")), self.config)

    def _parse_ckpt_path(self) -> None:
        config = self._subcommand_config()
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():  # before anything torch.loads it
            verify_checkpoint(ckpt_path)
        if not config.get(_LOAD_FLAG):
            return
        if not ckpt_path or not Path(ckpt_path).is_file():
            raise _UserError(
                f"--{_LOAD_FLAG}=true needs --ckpt_path to name a checkpoint file; got --ckpt_path={ckpt_path!r}. "
                "Pass the file (e.g. runs/checkpoints/last.ckpt), or drop the flag to use the configured model."
            )
        # The checkpoint's hyperparameters replace the model's. Done here, not by Lightning's own _parse_ckpt_path:
        # lightning before 2.6 passes a CLI-saved model's "_class_path" key on as an init argument and fails.
        hparams = dict(torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if hparams:
            if "_class_path" in hparams:
                hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
            subcommand = self.config.get("subcommand")
            update = {"model": hparams} if subcommand is None else {subcommand: {"model": hparams}}
            self.config = self.parser.parse_object(update, self.config)
        self._checkpoint_hparams_loaded = True

    def after_instantiate_classes(self) -> None:
        if self.subcommand is None:
            return
        self._check_links()
        self._check_checkpoint()
        self._check_directories()

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:
            self._explain_trainer_parts(error)
            raise

    def _explain_trainer_parts(self, error: ValueError) -> None:
        """jsonargparse reports a logger or callback whose constructor raised as "Not a valid subclass" and drops
        the constructor's message: build each part alone to recover it."""
        trainer = self._subcommand_config().get("trainer") or {}
        for key in ("logger", "callbacks"):
            parts = trainer.get(key)
            for index, part in enumerate(parts if isinstance(parts, list) else [parts]):
                if not hasattr(part, "class_path"):
                    continue
                init = {"class_path": part.class_path, "init_args": dict(vars(part.get("init_args") or {}))}
                try:
                    instantiate_class((), init)
                except Exception as cause:  # noqa: BLE001 - any constructor error is the one to report
                    name = part.class_path.rsplit(".", 1)[-1]
                    raise _UserError(f"trainer.{key}[{index}] ({name}): {cause}") from error

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        self._drop_logger_only_callbacks()
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, TypeError, ImportError) as error:
            raise _UserError(f"the trainer refused its arguments: {error} Fix the trainer option named here.") from error


    def _drop_logger_only_callbacks(self) -> None:
        """With ``--trainer.logger=false`` the callbacks whose only output is a logger (LearningRateMonitor,
        HealthReport) have nowhere to write and would refuse the fit: they are left out, with one line saying so."""
        from lightning.pytorch.callbacks import LearningRateMonitor

        from traincraft.callbacks import HealthReport

        trainer = self._get(self.config_init, "trainer", default={}) or {}
        callbacks = trainer.get("callbacks")
        if trainer.get("logger") not in (False, []) or not isinstance(callbacks, list):
            return
        dropped = [c for c in callbacks if isinstance(c, (LearningRateMonitor, HealthReport))]
        if dropped:
            trainer["callbacks"] = [c for c in callbacks if c not in dropped]
            names = ", ".join(sorted({type(c).__name__ for c in dropped}))
            print(f"traincraft: trainer.logger=false: {names} left out (they write only to a logger; remove "
                  "--trainer.logger=false to get them)", file=sys.stderr)


def main(args: Optional[ArgsType] = None) -> None:
    """Entry point of the ``traincraft`` console script.

    User errors (bad options, files, configurations, checkpoints, directories, trainer arguments) print
    ``traincraft: error: <what was wrong and what to do>`` and exit with status 2; a fit that diverges
    (``FloatingPointError`` from traincraft) prints its message and exits with status 1; internal errors print
    their traceback and exit with status 1. ``--debug`` or ``TRAINCRAFT_DEBUG=1``: every exception propagates as is.
    """
    if args is None:
        debug, rest = _debugging(sys.argv[1:])
        sys.argv[1:] = rest  # LightningCLI reads sys.argv itself (and warns when args are passed beside it)
    elif isinstance(args, (list, tuple)):
        debug, args = _debugging(list(args))
    else:
        debug = _debugging([])[0]
    given = sys.argv[1:] if args is None else list(args) if isinstance(args, (list, tuple)) else None
    if given == ["recipes"]:
        print_recipes()
        return
    if given and given[0] == "report":
        status = report_main([str(arg) for arg in given[1:]])
        if status:
            raise SystemExit(status)
        return
    previous = os.environ.get("JSONARGPARSE_DEBUG")
    if debug:
        os.environ["JSONARGPARSE_DEBUG"] = "true"  # jsonargparse's own tracebacks too
    try:
        TraincraftCLI(args=args)
        # Under DDP on gloo an undestroyed process group can abort the process at interpreter shutdown.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank done with its collectives before gloo is torn down
            torch.distributed.destroy_process_group()
    except Exception as error:
        if debug:
            raise
        _fail(error)
    finally:
        if previous is None:
            os.environ.pop("JSONARGPARSE_DEBUG", None)
        else:
            os.environ["JSONARGPARSE_DEBUG"] = previous


if __name__ == "__main__":
    main()
