"""ImageClassifier: the LightningModule that traincraft's recipes train."""

from __future__ import annotations

import random
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torchmetrics.classification import MulticlassAccuracy

from traincraft._steps import is_logging_step
from traincraft.augment.tta import MultiCropAveraging
from traincraft.models import build_model
from traincraft.modules.param_groups import apply_lr_multipliers, layerwise_param_groups

_RNG_KEY = "traincraft_rng_states"


class ImageClassifier(pl.LightningModule):
    """Image classification around any model: loss, top-1/top-5 accuracy, optimizers and per-layer rates.

    The model is a registered name (``"alexnet"``, ``"alexnet_two_column"``, ``"convnet"``, ``"mlp"``), a dotted
    class path, or an ``nn.Module``. Built by name, it receives ``num_classes``, ``in_channels`` and
    ``input_size`` (``traincraft fit`` links them from the DataModule) plus ``model_kwargs``.

    Optimizer and scheduler are callables, as LightningCLI builds them from YAML
    (``optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.1, momentum: 0.9, nesterov: true}}``): SGD,
    momentum, Nesterov, Adagrad, Adadelta, RMSprop, Adam, AdamW or any ``torch.optim`` optimizer.
    ``lr_multipliers`` gives layers their own learning rates as named parameter groups
    (see :func:`~traincraft.modules.layerwise_param_groups`).

    Logged metrics (``stage`` is ``train``, ``val`` or ``test``):

    ================== ============================================================
    key                meaning
    ================== ============================================================
    ``stage/loss``     cross-entropy (with label smoothing, if set)
    ``stage/acc``      top-1 accuracy
    ``stage/acc_top5`` top-5 accuracy (only with more than 5 classes)
    ================== ============================================================

    With ``test_time_augmentation`` (a :class:`~traincraft.augment.tta.MultiCropAveraging`), validation, test and
    prediction average the softmax over the configured views (scales, crops, mirrors); their loss is the negative
    log-likelihood of the averaged probabilities. Training is unchanged.

    Made to be subclassed: override :meth:`forward`, :meth:`per_example_loss` (the batch loss is its mean),
    :meth:`compute_loss` or :meth:`shared_step` to change one thing. ``training_step`` returns the detached
    per-example losses beside the loss, for :class:`~traincraft.callbacks.HardExampleMining`. The global RNG
    states travel in checkpoints, so a resumed single-process run continues exactly.

    Args:
        model: registered model name, dotted class path, or an ``nn.Module``.
        num_classes: number of classes; required when the model is built by name.
        in_channels: image channels, passed to a model built by name.
        input_size: image side in pixels, passed to a model built by name.
        model_kwargs: further constructor arguments of a model built by name (``width``, ``dropout``, ...).
        optimizer: optimizer factory, called with the parameter groups.
        scheduler: learning-rate scheduler factory, called with the optimizer.
        scheduler_interval: step the scheduler every ``"epoch"`` or every optimizer ``"step"``.
        scheduler_monitor: metric that ``ReduceLROnPlateau`` watches.
        lr_multipliers: ``{glob on parameter names: multiplier}`` for per-layer learning rates.
        label_smoothing: label smoothing of the cross-entropy, in ``[0, 1)``.
        test_time_augmentation: multi-crop / flip averaging for validation, test and prediction; ``None``: off.

    Example:
        >>> clf = ImageClassifier("mlp", num_classes=10, in_channels=1, input_size=8,
        ...                       lr_multipliers={"head.*": 0.1})
        >>> clf(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        model: Union[str, nn.Module] = "convnet",
        num_classes: Optional[int] = None,
        in_channels: Optional[int] = None,
        input_size: Optional[int] = None,
        model_kwargs: Optional[dict[str, Any]] = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: Optional[LRSchedulerCallable] = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        scheduler_monitor: str = "val/loss",
        lr_multipliers: Optional[dict[str, float]] = None,
        label_smoothing: float = 0.0,
        test_time_augmentation: Optional[MultiCropAveraging] = None,
    ) -> None:
        super().__init__()
        # Objects are not hyperparameters: a module or an optimizer factory would not load with weights_only.
        # Under `traincraft fit` the full configuration is saved and logged by the CLI instead.
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "test_time_augmentation", *(["model"] if isinstance(model, nn.Module) else [])])
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"num_classes must be an integer >= 2; got {num_classes!r}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1); got {label_smoothing}.")
        if not callable(optimizer):
            raise TypeError(
                f"optimizer must be a callable that takes parameter groups (an optimizer class or a "
                f"functools.partial of one); got {optimizer!r}."
            )
        if scheduler is not None and not callable(scheduler):
            raise TypeError(f"scheduler must be a callable that takes the optimizer; got {scheduler!r}.")
        if isinstance(model, str):
            model = self._build_named(model, num_classes, in_channels, input_size, model_kwargs or {})
        elif not isinstance(model, nn.Module):
            raise TypeError(f"model must be a model name, a dotted class path or an nn.Module; got {type(model).__name__}.")
        elif model_kwargs:
            raise ValueError("model_kwargs apply only to a model built by name; configure the nn.Module directly.")
        self.model = model
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.scheduler_monitor = scheduler_monitor
        self.lr_multipliers = dict(lr_multipliers or {})
        self.label_smoothing = label_smoothing
        if test_time_augmentation is not None and not isinstance(test_time_augmentation, MultiCropAveraging):
            raise TypeError(
                "test_time_augmentation must be a traincraft.augment.tta.MultiCropAveraging; got "
                f"{type(test_time_augmentation).__name__}."
            )
        self.test_time_augmentation = test_time_augmentation
        if lr_multipliers:  # fail at construction, not at the first fit, on patterns that match nothing
            layerwise_param_groups(self.model, self.lr_multipliers)
        self.metrics = nn.ModuleDict()
        if num_classes is not None:
            self._build_metrics(num_classes)

    @staticmethod
    def _build_named(name: str, num_classes, in_channels, input_size, kwargs: dict[str, Any]) -> nn.Module:
        if num_classes is None:
            raise ValueError(
                f"num_classes is required to build model {name!r} by name (traincraft fit links it from the data)."
            )
        given = {"num_classes": num_classes, "in_channels": in_channels, "input_size": input_size}
        clash = sorted(set(given) & set(kwargs))
        if clash:
            raise ValueError(f"give {clash} as ImageClassifier arguments, not in model_kwargs.")
        model = build_model(name, **kwargs, **{k: v for k, v in given.items() if v is not None})
        return model

    def _build_metrics(self, num_classes: int) -> None:
        # validate_args=False: the argument checks read tensor values, a host sync on every step.
        for stage in ("train", "val", "test"):
            self.metrics[f"{stage}_acc"] = MulticlassAccuracy(num_classes, top_k=1, validate_args=False)
            if num_classes > 5:
                self.metrics[f"{stage}_acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, validate_args=False)

    # ----------------------------------------------------------------- set up against the data
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if self.num_classes is None:
            if data_classes is None:
                raise ValueError("num_classes is unknown: pass num_classes=... or train with a traincraft DataModule.")
            self.num_classes = data_classes
            self._build_metrics(data_classes)
        elif data_classes is not None and data_classes != self.num_classes:
            raise ValueError(
                f"the model is built for num_classes={self.num_classes} but {type(datamodule).__name__} has "
                f"{data_classes} classes; set num_classes={data_classes}."
            )

    # ----------------------------------------------------------------- the parts to override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def compute_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The batch's loss: the mean of :meth:`per_example_loss`."""
        return self.per_example_loss(logits, targets).mean()

    def per_example_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss of every example, ``(batch,)``: cross-entropy with the module's label smoothing."""
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing, reduction="none")

    def _losses(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        # One cross-entropy gives the loss and the per-example losses. A subclass that overrides compute_loss gets
        # its own loss, and per-example losses only if it also overrides per_example_loss (the default would not
        # match its loss).
        if type(self).compute_loss is ImageClassifier.compute_loss:
            per_example = self.per_example_loss(logits, targets)
            return per_example.mean(), per_example
        loss = self.compute_loss(logits, targets)
        if type(self).per_example_loss is ImageClassifier.per_example_loss:
            return loss, None
        with torch.no_grad():
            return loss, self.per_example_loss(logits, targets)

    def shared_step(self, batch: Any, stage: str) -> dict[str, torch.Tensor]:
        """Forward, loss and metrics for one batch of ``(images, labels)``; returns ``{"loss": mean loss,
        "per_example_loss": detached losses (batch,)}`` (the second only while :meth:`per_example_loss` matches
        :meth:`compute_loss`: not when a subclass overrides ``compute_loss`` alone)."""
        images, targets = batch[0], batch[1]
        if self.test_time_augmentation is not None and stage != "train":
            # log of the averaged probabilities: cross-entropy of these is the NLL of the average, and top-k holds
            logits = self.test_time_augmentation(self, images).clamp_min(1e-12).log()
        else:
            logits = self(images)
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"the model returned logits of shape {tuple(logits.shape)}; expected (batch, {self.num_classes}). "
                f"Build the model with num_classes={self.num_classes}."
            )
        loss, per_example = self._losses(logits, targets)
        on_step = stage == "train"
        # Evaluation losses are averaged over all ranks; the training loss stays per rank (a reduction on every
        # step would be a collective per step). The accuracy metrics synchronize themselves at compute.
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(targets),
                 sync_dist=not on_step)
        for suffix in ("acc", "acc_top5"):
            key = f"{stage}_{suffix}"
            if key in self.metrics:
                metric = self.metrics[key]
                metric(logits.detach(), targets)
                self.log(f"{stage}/{suffix}", metric, on_step=on_step, on_epoch=True, prog_bar=suffix == "acc")
        if per_example is None:
            return {"loss": loss}
        return {"loss": loss, "per_example_loss": per_example.detach()}

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        """Returns ``{"loss", "per_example_loss"}``: Lightning optimizes ``loss``; callbacks such as
        :class:`~traincraft.callbacks.HardExampleMining` read the per-example losses from the outputs."""
        outputs = self.shared_step(batch, "train")
        if not isinstance(outputs, dict):  # a subclass's shared_step that returns the loss tensor
            outputs = {"loss": outputs}
        loss = outputs["loss"]
        if is_logging_step(self.trainer) and not torch.isfinite(loss):  # sync point: logging step only
            raise FloatingPointError(
                f"the training loss is {loss.item()} at step {self.global_step}. Lower the learning rate, add "
                "traincraft's GradientClipping callback, or check the inputs for non-finite values."
            )
        return outputs

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        return self.shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        return self.shared_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Class probabilities (softmax) for a batch of images, or of ``(images, labels)``."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        if self.test_time_augmentation is not None:
            return self.test_time_augmentation(self, images)
        return self(images).softmax(dim=-1)

    # ----------------------------------------------------------------- optimization
    def configure_optimizers(self) -> Any:
        groups = layerwise_param_groups(self.model, self.lr_multipliers)
        optimizer = apply_lr_multipliers(self.optimizer_factory(groups))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": self.scheduler_interval}
        if isinstance(scheduler, ReduceLROnPlateau):
            config["monitor"] = self.scheduler_monitor
        return {"optimizer": optimizer, "lr_scheduler": config}

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        np_state = np.random.get_state()
        checkpoint[_RNG_KEY] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            # plain types and tensors only, so the checkpoint loads with weights_only=True
            "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(int, np_state[2:4]), float(np_state[4])),
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_checkpoint_matches(checkpoint.get("state_dict", {}), checkpoint.get("hyper_parameters", {}))
        states = checkpoint.get(_RNG_KEY)
        # Every DDP rank would get rank 0's states; restore only where they are this process's own.
        if states is not None and (self._trainer is None or self.trainer.world_size == 1):
            torch.set_rng_state(states["torch"])
            if states["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states["cuda"])
            name, keys, pos, has_gauss, cached = states["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
            version, internal, gauss = states["python"]
            random.setstate((version, tuple(internal), gauss))

    def _check_checkpoint_matches(self, state_dict: dict[str, torch.Tensor], hparams: dict[str, Any]) -> None:
        own = {k: v.shape for k, v in self.state_dict().items()}
        theirs = {k: v.shape for k, v in state_dict.items()}
        missing = sorted(set(own) - set(theirs))
        unexpected = sorted(set(theirs) - set(own))
        mismatched = [f"{k}: checkpoint {tuple(theirs[k])} vs model {tuple(own[k])}" for k in own if k in theirs and theirs[k] != own[k]]
        if missing or unexpected or mismatched:
            described = {k: hparams[k] for k in ("model", "num_classes", "model_kwargs") if k in hparams}
            raise ValueError(
                "the checkpoint holds a different model than this ImageClassifier"
                + (f" (it was saved with {described})" if described else "")
                + f": {len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}, "
                f"{len(mismatched)} shape mismatches {mismatched[:5]}. Build the same model (name, num_classes, "
                "model_kwargs) as the run that saved it."
            )
