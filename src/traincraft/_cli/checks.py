"""The checks the ``traincraft`` command makes once its classes are built, before anything runs: values the data
links into the model, a checkpoint of another model, directories that cannot be written."""

from __future__ import annotations

import inspect
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule

from traincraft._cli.errors import _UserError

#: (data attribute, model argument, what it is): values the data decides and the CLI links into the model.
LINKS: tuple[tuple[str, str, str], ...] = (
    ("num_classes", "num_classes", "classes"),
    ("in_channels", "in_channels", "input channels"),
    ("model_input_size", "input_size", "as its model input size (the image side after any crop of the augmentation)"),
)

# Model hyperparameters that shape training, not the network: a checkpoint may differ in them (the configured
# value is used). Every other saved hyperparameter must match the checkpoint's, or its weights belong elsewhere.
_TRAINING_SETTINGS = frozenset(
    {"optimizer", "scheduler", "scheduler_interval", "scheduler_monitor", "lr_multipliers", "label_smoothing",
     "on_nonfinite", "test_time_augmentation"}
)
_LOAD_FLAG = "load_model_from_checkpoint"


def _unwritable(path: str) -> Optional[str]:
    """Why ``path`` cannot become a writable directory (None: it can). Creates nothing that stays."""
    target = Path(path).expanduser().absolute()
    existing = target
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    try:
        handle, probe = tempfile.mkstemp(prefix=".traincraft-write-test-", dir=existing)
    except OSError as error:
        return f"{existing} is not writable ({error.strerror or error})"
    os.close(handle)
    os.unlink(probe)
    return None


def _describe(hparams: dict[str, Any], keys: list[str]) -> str:
    name = str(hparams.get("_class_path", "the model")).rsplit(".", 1)[-1]
    return f"{name}({', '.join(f'{key}={hparams.get(key)!r}' for key in keys if key != '_class_path')})"


def _model_differences(saved: dict[str, Any], built: dict[str, Any]) -> list[str]:
    """Hyperparameters that define the network and differ between a checkpoint and the configured model."""
    keys = [k for k in saved if k in built and k != "_instantiator" and k not in _TRAINING_SETTINGS]
    return [k for k in keys if saved[k] != built[k]]


def check_checkpoint_model(path: str, saved: dict[str, Any], built: dict[str, Any]) -> None:
    """Refuse a checkpoint whose saved model hyperparameters contradict the configured model's."""
    differences = _model_differences(saved, built)
    if not differences:
        return
    linked = [k for k in differences if k in {target for _, target, _ in LINKS}]
    hint = (
        f" ({', '.join(linked)} come{'s' if len(linked) == 1 else ''} from the data: is this the data the "
        "checkpoint was trained on?)" if linked else ""
    )
    raise _UserError(
        f"the checkpoint {path} holds another model: it was saved from {_describe(saved, differences)}, but the "
        f"configuration builds {_describe(built, differences)}{hint}. Pass --{_LOAD_FLAG}=true to build the "
        "checkpoint's model instead, change the model configuration to match it, or choose another checkpoint."
    )


class _CheckpointModelGuard:
    """Wraps a module's ``on_load_checkpoint``: checks the checkpoint's model before Lightning loads its weights.

    For ``--ckpt_path last``/``best``, which only the trainer resolves to a file."""

    def __init__(self, module: LightningModule) -> None:
        self.module = module
        self.original = module.on_load_checkpoint

    def __call__(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("hyper_parameters") or {}
        check_checkpoint_model(str(self.module.trainer.ckpt_path), saved, dict(self.module.hparams))
        self.original(checkpoint)


class _InstantiationChecks:
    """The checks of :class:`~traincraft.cli.TraincraftCLI` after instantiation (a LightningCLI mixin)."""

    _checkpoint_hparams_loaded: bool

    def _check_links(self) -> None:
        """A model value that the data links must not be set to anything else: the link would override it."""
        model_config = self._subcommand_config().get("model")
        if self.datamodule is None or model_config is None:
            return
        init_args = {**dict(model_config.get("dict_kwargs") or {}), **vars(model_config.get("init_args") or {})}
        signature = inspect.signature(type(self.model).__init__).parameters
        for source, target, what in LINKS:
            given = init_args.get(target)
            default = signature[target].default if target in signature else None
            linked = getattr(self.datamodule, source, None)
            if given is None or given in (default, linked):
                continue
            origin = (
                f"the checkpoint {self._subcommand_config().get('ckpt_path')} saved model.init_args.{target}={given!r}"
                if self._checkpoint_hparams_loaded
                else f"model.init_args.{target}={given!r} was set"
            )
            data = type(self.datamodule).__name__
            amount = f"has {linked} {what}" if what in ("classes", "input channels") else f"gives {linked} {what}"
            fix = (
                f"Use the data the checkpoint was trained on ({source}={given!r}), or drop --{_LOAD_FLAG}"
                if self._checkpoint_hparams_loaded
                else f"Remove the setting (the data decides), or use data with {source}={given!r}"
            )
            raise _UserError(
                f"{origin}, but the data ({data}) {amount} and links it: traincraft sets model.init_args.{target} "
                f"from data.{source}. {fix}."
            )

    def _check_checkpoint(self) -> None:
        ckpt_path = self._subcommand_config().get("ckpt_path")
        if not ckpt_path or self._checkpoint_hparams_loaded:
            return
        if Path(ckpt_path).is_file():
            try:  # as Lightning's CLI reads hyperparameters; objects weights_only refuses are left to the trainer
                saved = torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters")
            except Exception:  # noqa: BLE001 - checked again when the trainer loads it
                saved = None
            if saved is not None:
                check_checkpoint_model(str(ckpt_path), saved, dict(self.model.hparams))
                return
        # "last", "best", or a file read above failed: check the checkpoint the trainer loads, before its weights
        self.model.on_load_checkpoint = _CheckpointModelGuard(self.model)

    def _check_directories(self) -> None:
        trainer = self.trainer
        places = [("trainer.default_root_dir", trainer.default_root_dir, "--trainer.default_root_dir=<dir>")]
        for index, logger in enumerate(trainer.loggers):
            where = f"save_dir of trainer.logger[{index}] ({type(logger).__name__})"
            places.append((where, logger.save_dir, "that logger's init_args.save_dir in trainer.logger"))
        if self.subcommand == "fit":
            configured = self._get(self.config_init, "checkpoint")
            for callback in trainer.checkpoint_callbacks:
                if callback is configured:
                    places.append(("checkpoint.dirpath", callback.dirpath, "--checkpoint.dirpath=<dir>"))
                else:
                    name = type(callback).__name__
                    places.append((f"dirpath of {name}", getattr(callback, "dirpath", None), f"{name}'s dirpath"))
        for key, path, fix in places:
            if path is None or "://" in str(path):  # remote file systems: left to fsspec
                continue
            reason = _unwritable(str(path))
            if reason is not None:
                raise _UserError(f"cannot write to {path!r} ({key}): {reason}. Set {fix} to a directory you can write to.")

