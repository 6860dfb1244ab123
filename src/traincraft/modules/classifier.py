"""ImageClassifier: the LightningModule that traincraft's recipes train."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from traincraft._steps import completed_step_is_logging
from traincraft.augment.tta import MultiCropAveraging
from traincraft.checkpoint import VerifiedLoading
from traincraft.modules._checkpoint import check_same_model, rng_states, set_rng_states
from traincraft.modules._construction import accuracy_metrics, check_arguments, check_tta, make_model
from traincraft.modules._labels import EvalLabelRange, check_label_format, label_message
from traincraft.modules._nonfinite import NonFiniteGuard, act_on_report
from traincraft.modules.param_groups import apply_lr_multipliers, layerwise_param_groups

_RNG_KEY = "traincraft_rng_states"


def _is_empty(batch: Any) -> bool:
    """A batch without images (a shape, known on the host: no sync)."""
    images = batch[0] if isinstance(batch, (tuple, list)) else batch
    return isinstance(images, torch.Tensor) and images.ndim > 0 and images.shape[0] == 0


class ImageClassifier(VerifiedLoading, pl.LightningModule):
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
    ``train/nonfinite_steps`` optimizer steps skipped as non-finite since the fit began (logging steps)
    ================== ============================================================

    **Non-finite steps.** Every optimizer step is checked on the device, with no host synchronization: a
    non-finite loss in the step's batches (all micro-batches of an accumulation window), or a non-finite gradient
    after unscaling. Such a step is skipped exactly: parameters and optimizer state (momentum, Adam moments, step
    counts) and the module's buffers (BatchNorm running statistics, which the forward pass already changed) stay
    bit-identical, as if the step's batches had not been drawn. To do this without reading the flag, parameters and
    optimizer state are copied before each step and put back by the flag after it (one copy per step); a
    ``fused=True`` optimizer gets the flag as ``found_inf`` instead (no copy). Buffers are copied at the start of
    each accumulation window. State that a skipped step created is zeroed, which is what SGD (without dampening),
    Adam, AdamW, Adamax, RAdam, RMSprop and Adadelta would create; for other optimizers the step that creates the
    state reads the flag once, to delete it. The first bad step is recorded on the device and read at the next
    logging step and at the end of the fit, where ``on_nonfinite`` decides: ``"raise"`` a ``FloatingPointError``
    naming the step (the fit ends with an error, and any checkpoint holds the finite weights of before that step),
    ``"warn"`` and go on, or ``"skip"`` silently (the count is logged). With the
    :class:`~traincraft.callbacks.GradientClipping` callback, or under fp16 mixed precision, the callback (or the
    GradScaler) already skips non-finite gradients: the module then copies no parameters or optimizer state (nor,
    with GradientClipping, which restores them itself, buffers); it multiplies the loss of a batch with a non-finite
    loss or bad labels by NaN, so that they skip it, and reports it. Gradient-only events are theirs to skip and
    report (``grad/skipped_steps``, ``max_consecutive_skips``).

    **Labels** must be integer class indices of shape ``(batch,)``: float, bool or one-hot labels raise at once
    (a dtype and shape check, free). Their range is checked on the device on every batch (reading it at once would
    be a synchronization): labels are clamped so that the loss cannot fail, a batch with a label outside
    ``[0, num_classes)`` is skipped like a non-finite one, and the next logging step (or the end of the fit) raises a
    ``ValueError`` naming the step, the labels received and ``num_classes``, whatever ``on_nonfinite`` says. Validation and test labels are
    checked on the device and reported at the end of the epoch.

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
        on_nonfinite: what a skipped non-finite step leads to at the next check: ``"raise"``, ``"warn"`` or
            ``"skip"`` (see above).

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
        on_nonfinite: Literal["raise", "warn", "skip"] = "raise",
    ) -> None:
        super().__init__()
        # Objects are not hyperparameters: a module or an optimizer factory would not load with weights_only.
        # Under `traincraft fit` the full configuration is saved and logged by the CLI instead.
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "test_time_augmentation", *(["model"] if isinstance(model, nn.Module) else [])])
        check_arguments(num_classes, on_nonfinite, label_smoothing, optimizer, scheduler)
        self.model = make_model(model, num_classes, in_channels, input_size, model_kwargs)
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.scheduler_monitor = scheduler_monitor
        self.lr_multipliers = dict(lr_multipliers or {})
        self.label_smoothing = label_smoothing
        self.on_nonfinite = on_nonfinite
        self._guard = NonFiniteGuard()
        self._batch_labels: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._batch_idx = 0
        self._eval_labels = EvalLabelRange()
        check_tta(test_time_augmentation)
        self.test_time_augmentation = test_time_augmentation
        if lr_multipliers:  # fail at construction, not at the first fit, on patterns that match nothing
            layerwise_param_groups(self.model, self.lr_multipliers)
        self.metrics = nn.ModuleDict()
        if num_classes is not None:
            self._build_metrics(num_classes)

    def _build_metrics(self, num_classes: int) -> None:
        self.metrics.update(accuracy_metrics(num_classes))

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
        targets = self._checked_labels(targets, len(images), stage)  # before the forward pass changes BN statistics
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

    def training_step(self, batch: Any, batch_idx: int) -> Optional[dict[str, torch.Tensor]]:
        """Returns ``{"loss", "per_example_loss"}``: Lightning optimizes ``loss``; callbacks such as
        :class:`~traincraft.callbacks.HardExampleMining` read the per-example losses from the outputs. An empty
        batch (every file of it skipped as unreadable, ``on_error="skip"``) returns ``None``: Lightning skips it."""
        if _is_empty(batch):
            return None
        outputs = self.shared_step(batch, "train")
        if not isinstance(outputs, dict):  # a subclass's shared_step that returns the loss tensor
            outputs = {"loss": outputs}
        self._batch_idx = batch_idx
        if self._guard.attached:
            labels, self._batch_labels = self._batch_labels, None
            bad = self._guard.note_batch(outputs["loss"], *(labels or (None, None)))
            # A bad batch's gradients become NaN: the step is skipped by whichever guard sees them (this module's,
            # GradientClipping's or fp16's GradScaler), and under DDP the NaN reaches every rank's all-reduce.
            outputs = {**outputs, "loss": outputs["loss"] * torch.where(bad, torch.nan, 1.0).to(outputs["loss"].dtype)}
        return outputs

    def _checked_labels(self, targets: Any, batch: int, stage: str) -> torch.Tensor:
        """Labels as int64 class indices, clamped into ``[0, num_classes)`` so that the loss cannot fail on them;
        out-of-range ones are flagged on the device (see the class docstring)."""
        targets = check_label_format(targets, batch, self.num_classes)
        high = self.num_classes - 1
        bad = ((targets < 0) | (targets > high)).any()
        if stage == "train" and not self._guard.attached and targets.numel():
            # called outside a fit (no logging steps to report at): check here
            low_seen, high_seen = torch.aminmax(targets)
            low_seen, high_seen = int(low_seen), int(high_seen)
            if low_seen < 0 or high_seen > high:
                raise ValueError(label_message(self.num_classes, low_seen, high_seen, "this training batch"))
        if stage == "train":
            self._batch_labels = (bad, targets)
        else:
            self._eval_labels.note(targets)
        return targets.clamp(0, high)

    # ----------------------------------------------------------------- the non-finite guard
    def on_train_start(self) -> None:
        # GradientClipping says so by a class attribute: modules may not import callbacks
        clipping = any(getattr(cb, "skips_nonfinite_steps", False) for cb in self.trainer.callbacks)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        # GradientClipping skips non-finite gradients and restores the buffers itself; fp16's GradScaler only skips
        self._guard.attach(self.trainer.optimizers, self, owns_skip=not (clipping or scaler), buffers=not clipping)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._guard.attached:
            self._guard.start_batch()

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self._guard.attached:
            self._guard.before_step(optimizer, self.trainer.global_step, self.current_epoch, self._batch_idx)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._guard.attached and completed_step_is_logging(self.trainer):
            report = self._guard.read()  # sync point: logging step only
            self.log("train/nonfinite_steps", float(report.total), on_step=True, on_epoch=False, batch_size=1)
            act_on_report(report, self.on_nonfinite, self.num_classes, "")

    def on_train_end(self) -> None:
        if self._guard.attached:
            report = self._guard.read()  # sync point: the end of the fit, for steps after the last logging step
            self._guard.detach()
            act_on_report(report, self.on_nonfinite, self.num_classes, " (after the last logging step)")

    def teardown(self, stage: str) -> None:
        self._guard.detach()

    def on_validation_epoch_start(self) -> None:
        self._eval_labels.start(self.device)

    def on_validation_epoch_end(self) -> None:
        self._eval_labels.end(self.num_classes, "validation")

    def on_test_epoch_start(self) -> None:
        self._eval_labels.start(self.device)

    def on_test_epoch_end(self) -> None:
        self._eval_labels.end(self.num_classes, "test")

    def validation_step(self, batch: Any, batch_idx: int) -> Optional[dict[str, torch.Tensor]]:
        return None if _is_empty(batch) else self.shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Optional[dict[str, torch.Tensor]]:
        return None if _is_empty(batch) else self.shared_step(batch, "test")

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
        checkpoint[_RNG_KEY] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_same_model(self.state_dict(), checkpoint.get("state_dict", {}), checkpoint.get("hyper_parameters", {}))
        states = checkpoint.get(_RNG_KEY)
        # Every DDP rank would get rank 0's states; restore only where they are this process's own.
        if states is not None and (self._trainer is None or self.trainer.world_size == 1):
            set_rng_states(states)
