"""``traincraft`` console script: LightningCLI with traincraft's default recipe, loggers and checkpoints.

Every error a user can cause (a bad option or file, a value the data contradicts, a checkpoint of another model,
a directory that cannot be written, a trainer argument Lightning refuses) ends the program with one message and
exit status 2, before training. ``--debug`` (anywhere on the command line) or ``TRAINCRAFT_DEBUG=1`` lets every
exception propagate with its traceback instead.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
import tempfile
import traceback
from importlib import resources
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

from traincraft.checkpoint import CheckpointError, verify_checkpoint
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
_DEBUG_FLAG = "--debug"
_DEBUG_ENV = "TRAINCRAFT_DEBUG"


class _UserError(ValueError):
    """A configuration the CLI refuses: ``main`` prints its message alone (exit status 2)."""


# ---------------------------------------------------------------------------------------------------- recipes
# The recipes ship inside the package (traincraft/recipes/*.yaml), so `--config NAME` works from any directory.
_RECIPE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_CONFIG_FLAGS = ("--config", "-c")


def recipes() -> dict[str, str]:
    """The shipped recipes: ``{name: description}``, the description being each file's first comment line.

    Example:
        >>> "digits_alexnet_small" in recipes()
        True
    """
    found = {}
    for entry in sorted(resources.files("traincraft").joinpath("recipes").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            first = entry.read_text().splitlines()[0] if entry.read_text() else ""
            found[entry.name[: -len(".yaml")]] = first.lstrip("#").strip()
    return found


def recipe_path(name: str) -> str:
    """The file of the shipped recipe ``name`` (with or without ``.yaml``); a clear error for an unknown name."""
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    names = recipes()
    if stem not in names:
        raise _UserError(
            f"--config {name!r} is neither a file nor a shipped recipe; the shipped recipes are "
            f"{', '.join(names)}. Pass one of those names, or the path of a YAML file (`traincraft recipes` lists "
            "the recipes with a line each)."
        )
    with resources.as_file(resources.files("traincraft").joinpath("recipes", f"{stem}.yaml")) as path:
        return str(path)  # a real file: the package is installed unzipped (setuptools' default)


def _resolve_config(value: str) -> str:
    """A ``--config`` value as given when it is a file or not name-like (inline YAML, a missing path with
    directories: jsonargparse reports those); else the shipped recipe of that name."""
    if Path(value).expanduser().is_file() or not _RECIPE_NAME.fullmatch(value):
        return value
    if "." in value and not value.endswith(".yaml"):  # e.g. my.yml: a file name, not a recipe name
        return value
    return recipe_path(value)


def resolve_recipe_args(args: list[str]) -> list[str]:
    """``args`` with every ``--config NAME`` (or ``--config=NAME``, ``-c NAME``) naming a shipped recipe replaced
    by that recipe's path; paths to existing files are kept as they are."""
    resolved = list(args)
    for index, arg in enumerate(resolved):
        if arg in _CONFIG_FLAGS and index + 1 < len(resolved):
            resolved[index + 1] = _resolve_config(resolved[index + 1])
        elif arg.startswith("--config="):
            resolved[index] = "--config=" + _resolve_config(arg[len("--config="):])
    return resolved


def print_recipes() -> None:
    """``traincraft recipes``: one line per shipped recipe."""
    names = recipes()
    width = max(map(len, names), default=0)
    for name, description in names.items():
        print(f"{name:<{width}}  {description}")
    print("\nRun one with `traincraft fit --config NAME`; `traincraft fit --config NAME --print_config > my.yaml` "
          "writes it out to edit.")


# ----------------------------------------------------------------------------------------------- health report
_SEVERITY_RANK = {"info": 0, "warning": 1, "problem": 2}


def report_main(argv: list[str]) -> int:
    """``traincraft report RUN [--out DIR] [--fail-on {problem,warning}]``: write the health report of a run.

    ``RUN`` is a run directory, a ``metrics.csv``, a TensorBoard event folder or file, or a W&B run directory.
    Prints the page's path and one line per diagnosis; returns the exit status: 0, 1 when ``--fail-on`` finds a
    diagnosis of that severity or worse, 2 for a ``RUN`` that cannot be read (one line saying why).
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="traincraft report",
        description="Write the training health report of a run (report.html, panels/*.png, diagnoses.json) and "
        "print its diagnoses. docs/health-report.md explains the panels and the rules.",
    )
    parser.add_argument("run", metavar="RUN", help="a run directory, a metrics.csv, a TensorBoard event folder or "
                        "file, or a W&B run directory (wandb/offline-run-*)")
    parser.add_argument("--out", metavar="DIR", help="folder to write to (default: RUN/health_report, or next to a "
                        "file RUN)")
    parser.add_argument("--fail-on", choices=("problem", "warning"), help="exit with status 1 when a diagnosis of "
                        "this severity or worse is found (to gate CI on a run's health)")
    args = parser.parse_args(argv)
    run = Path(args.run).expanduser()
    if not run.exists():
        print(f"traincraft report: error: {args.run!r} does not exist. Pass a run directory, a metrics.csv, a "
              "TensorBoard event folder or a W&B run directory.", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (run if run.is_dir() else run.parent) / "health_report"
    reason = _unwritable(str(out))
    if reason is not None:
        print(f"traincraft report: error: cannot write the report to {str(out)!r}: {reason}. Pass --out DIR with a "
              "folder you can write to.", file=sys.stderr)
        return 2
    from traincraft.report import build_report  # matplotlib loads only for this subcommand

    try:
        report = build_report(run)
    except (ValueError, OSError) as error:  # nothing readable there, or an unreadable file: the reader says which
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"traincraft report: error: cannot read a run from {str(run)!r}: {message}", file=sys.stderr)
        return 2
    html = report.write(out)
    print(f"health report: {html}")
    print(report.summary())
    if args.fail_on is not None:
        bad = [d for d in report.diagnoses if _SEVERITY_RANK[d.severity] >= _SEVERITY_RANK[args.fail_on]]
        if bad:
            print(f"traincraft report: {len(bad)} diagnosis(es) of severity '{args.fail_on}' or worse "
                  f"(--fail-on {args.fail_on})", file=sys.stderr)
            return 1
    return 0


class _SaveAndLogConfig(SaveConfigCallback):
    """Writes ``config.yaml`` to the run directory and sends the whole configuration to every logger."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        config = self.parser.dump(self.config, skip_none=False, format="json")
        for logger in trainer.loggers:
            logger.log_hyperparams({"cli_config": config})


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


class TraincraftCLI(LightningCLI):
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


# ---------------------------------------------------------------------------------------------------- errors
# A user error ends the program with one line (exit 2); anything else is a bug and keeps its traceback (exit 1).


def _raised_in(error: BaseException, packages: tuple[str, ...]) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and any(f"{os.sep}{package}{os.sep}" in frames[-1].filename for package in packages)


def _raised_in_callback(error: BaseException) -> bool:
    """Whether a traincraft callback raised ``error`` (or one it was raised from)."""
    while error is not None:
        folder = f"{os.sep}traincraft{os.sep}callbacks{os.sep}"
        if any(folder in frame.filename for frame in traceback.extract_tb(error.__traceback__)):
            return True
        error = error.__cause__
    return False


def _user_message(error: BaseException) -> Optional[str]:
    """The message for an error the user can fix, or None for an internal error."""
    import argparse

    chain = [error]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    for link in chain:
        if isinstance(link, _UserError):
            return str(link)
        if isinstance(link, argparse.ArgumentError):
            return f"{link}\nSee `traincraft <subcommand> --help` for the accepted options."
    cause = chain[-1]
    if isinstance(cause, (CheckpointError, MisconfigurationException, ImportError)):  # ImportError: a missing extra
        return str(cause)
    if isinstance(cause, OSError) and not isinstance(cause, ConnectionError):
        if cause.filename is not None and cause.strerror:
            return f"{cause.strerror}: {cause.filename!r}. Check the path and its permissions."
        return str(cause)
    if isinstance(cause, RuntimeError) and str(cause).startswith("Error(s) in loading state_dict"):
        return f"the checkpoint's weights do not fit the model: {cause}"
    if type(cause).__module__.startswith(("wandb", "yaml")) and type(cause).__name__ in (
        "UsageError", "AuthenticationError", "YAMLError", "ScannerError", "ParserError"
    ):
        return str(cause)
    if isinstance(cause, (ValueError, TypeError, KeyError)) and _raised_in(
        cause, ("traincraft", "lightning", "jsonargparse")
    ):
        return str(cause)
    return None


def _debugging(argv: list[str]) -> tuple[bool, list[str]]:
    flag = _DEBUG_FLAG in argv
    rest = [arg for arg in argv if arg != _DEBUG_FLAG]
    return flag or os.environ.get(_DEBUG_ENV, "").lower() in ("1", "true", "yes"), rest


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
        if isinstance(error, FloatingPointError) and _raised_in(error, ("traincraft",)):
            # training diverged (a non-finite step under on_nonfinite='raise'): a result, not a bug or a typo
            print(f"traincraft: error: FloatingPointError: {error}", file=sys.stderr)
            raise SystemExit(1) from error
        from traincraft.callbacks.health_report import UnhealthyRunError

        if isinstance(error, UnhealthyRunError):  # HealthReport(fail_on=...): the run trained but is unhealthy
            print(f"traincraft: error: {error}", file=sys.stderr)
            raise SystemExit(1) from error
        message = _user_message(error)
        if message is not None:
            if _raised_in_callback(error):
                message += ("\nThe recipes turn on traincraft's monitors (trainer.callbacks); configure the one named "
                            "above, or pass --trainer.callbacks=[] for a plain Lightning fit without them.")
            print(f"traincraft: error: {message}", file=sys.stderr)
            raise SystemExit(2) from error
        traceback.print_exception(error)
        print(
            f"traincraft: internal error: {type(error).__name__}: {error}\nThis looks like a bug (in traincraft, a "
            f"library or your own module), not a configuration problem. Rerun with {_DEBUG_FLAG} (or "
            f"{_DEBUG_ENV}=1) to let the exception propagate, e.g. into a debugger, and report it with the "
            "traceback above.",
            file=sys.stderr,
        )
        raise SystemExit(1) from error
    finally:
        if previous is None:
            os.environ.pop("JSONARGPARSE_DEBUG", None)
        else:
            os.environ["JSONARGPARSE_DEBUG"] = previous


if __name__ == "__main__":
    main()
