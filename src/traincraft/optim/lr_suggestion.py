"""A learning rate from the loss's curvature: half the optimizer's stability limit η < threshold/λ_max.

Along a direction of curvature λ gradient descent converges fastest at η = 1/λ and diverges above 2/λ; with
momentum β (heavy ball) it converges at its best rate √β for every η·λ in [(1-√β)², (1+√β)²] and diverges above
2+2β; Adam with β₁ is that iteration with rate η(1-β₁) on the preconditioned Hessian P⁻¹H, P = diag(√v̂)+ε, so its
limit is η·λ_max(P⁻¹H) < (2+2β₁)/(1-β₁) (Cohen et al. 2022). The thresholds are
:func:`~traincraft.metrics.hessian.stability_threshold`'s. The suggestion is ``fraction`` (default 1/2) of the
largest stable rate: for gradient descent that is exactly 1/λ_max, the best rate along the sharpest direction (the
lecture); with momentum it is the middle of the band where the sharpest direction converges at the best rate
momentum allows. The margin of 2 is there because training at a fixed η sharpens the loss until λ_max reaches the
limit 2/η ("progressive sharpening", Cohen et al. 2021, "edge of stability"), and because λ_max is measured on a
few batches near the start: the curvature the run meets later is larger.

The step's curvature and the thresholds by optimizer kind are ``_step_curvature.py``'s; the module's one
optimizer, its batches and the snapshot that leaves it as it was are ``_probe_module.py``'s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from torch.optim import Optimizer

from traincraft.callbacks.curvature import CurvatureMonitor
from traincraft.metrics.hessian import is_preconditioned, stability_threshold
from traincraft.optim._probe_module import _concatenate, _cycle, _prepare, _single_optimizer, _Snapshot
from traincraft.optim._step_curvature import (
    _check_fraction,
    _describe,
    _step_sharpness,
    _threshold_of_kind,
    _unknown_optimizer,
)


@dataclass(frozen=True)
class LRSuggestion:
    """What :func:`suggest_learning_rate` found.

    Attributes:
        lr: the suggested learning rate (``fraction * threshold_lr``), in the unit of the optimizer's own ``lr``
            argument (per-group multipliers, e.g. ``lr_multipliers``, stay on top of it).
        lambda_max: the curvature the limit applies to, per unit of that ``lr``: the Hessian's largest eigenvalue
            for SGD, λ_max(P⁻¹H) (with the per-group multipliers) for Adam/AdamW/RMSprop/Adagrad.
        threshold_lr: the largest stable rate, ``threshold / lambda_max``.
        threshold: the optimizer's stability threshold on η·λ (2, 2+2β, (2+2β₁)/(1-β₁), ...).
        optimizer: the optimizer and the settings the threshold depends on, e.g. ``"SGD(momentum=0.9, nesterov)"``.
        fraction: ``lr / threshold_lr``.
        batches: training batches the Hessian was taken on.
        warmup_steps: optimizer steps taken (and undone) before measuring.
        seconds: wall time of the whole suggestion.
    """

    lr: float
    lambda_max: float
    threshold_lr: float
    threshold: float
    optimizer: str
    fraction: float
    batches: int
    warmup_steps: int
    seconds: float

    def __str__(self) -> str:
        return (f"suggested lr {self.lr:.3g} = {self.fraction:g} x the stability limit {self.threshold_lr:.3g} "
                f"({self.threshold:g}/λ_max, λ_max {self.lambda_max:.4g} for {self.optimizer}; {self.batches} batches "
                f"after {self.warmup_steps} warm-up steps, {self.seconds:.1f} s)")


def lr_from_curvature(lambda_max: float, optimizer: Union[str, Optimizer] = "sgd", *, momentum: float = 0.0,
                      nesterov: bool = False, beta1: float = 0.9, fraction: float = 0.5) -> float:
    """The learning rate ``fraction * threshold / lambda_max`` for an optimizer's stability threshold on η·λ.

    ``lambda_max`` is the Hessian's largest eigenvalue for SGD and the preconditioned one λ_max(P⁻¹H) for
    Adam/AdamW. ``fraction=1`` gives the largest stable rate itself.

    Args:
        lambda_max: the curvature, a finite number > 0.
        optimizer: an optimizer instance (its threshold, smallest over its groups), or ``"sgd"``, ``"adam"`` or
            ``"adamw"`` with the settings below.
        momentum: SGD's momentum β (heavy ball: threshold 2+2β).
        nesterov: SGD with Nesterov momentum (threshold (2+2β)/(1+2β)).
        beta1: Adam's β₁ (threshold (2+2β₁)/(1-β₁)).
        fraction: the share of the largest stable rate, in (0, 1]; 1/2 gives 1/λ_max for gradient descent.

    Example:
        >>> lr_from_curvature(100.0)  # gradient descent: 1/λ_max
        0.01
        >>> round(lr_from_curvature(100.0, "sgd", momentum=0.9, fraction=1.0), 6)  # (2+2β)/λ
        0.038
        >>> round(lr_from_curvature(1000.0, "adam", beta1=0.9), 6)  # 19/λ_max(P⁻¹H)
        0.019
    """
    if isinstance(lambda_max, bool) or not isinstance(lambda_max, (int, float)) or not math.isfinite(lambda_max) \
            or lambda_max <= 0:
        raise ValueError(f"lambda_max must be a finite number > 0; got {lambda_max!r}. With λ_max <= 0 the loss curves "
                         "down along every probed direction, so curvature sets no limit on the rate: measure later in "
                         "training (more warm-up steps) or use Lightning's Tuner.lr_find.")
    _check_fraction(fraction)
    if isinstance(optimizer, Optimizer):
        threshold = stability_threshold(optimizer)
        if threshold is None:
            raise ValueError(_unknown_optimizer(optimizer))
    else:
        threshold = _threshold_of_kind(optimizer, momentum, nesterov, beta1)
    return fraction * threshold / lambda_max


def suggest_learning_rate(
    module: pl.LightningModule,
    datamodule: Optional[pl.LightningDataModule] = None,
    *,
    train_dataloaders: Optional[Iterable[Any]] = None,
    batches: int = 1,
    warmup_steps: int = 10,
    iterations: int = 10,
    fraction: float = 0.5,
    seed: int = 0,
) -> LRSuggestion:
    """Suggest a learning rate for ``module``'s optimizer from the curvature of its loss on a few training batches.

    The optimizer ``module.configure_optimizers()`` returns takes ``warmup_steps`` steps at its configured rate (the
    curvature at initialization is atypical, and Adam needs its second moments v̂), then Lanczos on exact
    Hessian-vector products (:func:`~traincraft.metrics.hessian.lanczos`, as in
    :class:`~traincraft.callbacks.CurvatureMonitor`) finds the largest eigenvalue of the step's curvature η·H on
    ``batches`` further batches taken together, preconditioned by the optimizer's state for adaptive optimizers. The result is ``fraction`` of the largest stable rate (:func:`lr_from_curvature`; the module
    docstring says why 1/2). Afterwards the module is exactly as before: weights, buffers, ``.grad``, train/eval
    modes, and the torch, Python and NumPy random states; schedulers are not built (the rate is the starting one).

    Batches go through the same hooks as in training (``on_before_batch_transfer``, the move to the module's
    device, ``on_after_batch_transfer``: the DataModule's normalization), with no trainer attached, so on-device
    augmentation that runs only while training is off. The loss is the one :class:`CurvatureMonitor` probes:
    ``module.probe_loss(batch)``, else ``module.compute_loss(module(x), y)``.

    Args:
        module: the LightningModule, before (or between) fits.
        datamodule: gives the training batches (``prepare_data``, ``setup("fit")``, ``train_dataloader()``).
        train_dataloaders: the training batches instead of a datamodule (any iterable; cycled if short).
        batches: batches the Hessian is taken on (concatenated into one batch).
        warmup_steps: optimizer steps before measuring; at least 1 for adaptive optimizers.
        iterations: Lanczos iterations (Hessian-vector products).
        fraction: share of the largest stable rate to suggest, in (0, 1].
        seed: seeds the torch RNG during the suggestion (dropout, loader shuffling), so it is repeatable.

    Raises:
        TypeError: the module has several optimizers, an optimizer without a known stability threshold, or no loss
            to probe.
        traincraft.metrics.hessian.DoubleBackwardError: the model cannot be differentiated twice (names the module).
        ValueError: bad arguments, or λ_max <= 0 (no curvature limit here).

    Example:
        >>> from traincraft.modules import ImageClassifier
        >>> from traincraft.data import DigitsDataModule
        >>> _ = torch.manual_seed(0)
        >>> model = ImageClassifier(model="mlp", num_classes=10, in_channels=1, input_size=8,
        ...                         model_kwargs={"hidden": [32]})
        >>> found = suggest_learning_rate(model, DigitsDataModule(image_size=8, batch_size=32), batches=2,
        ...                               warmup_steps=3)
        >>> 0 < found.lr < found.threshold_lr
        True
    """
    for name, value, low in (("batches", batches, 1), ("warmup_steps", warmup_steps, 0), ("iterations", iterations, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}; got {value!r}. The defaults: batches=1, "
                             "warmup_steps=10, iterations=10.")
    _check_fraction(fraction)
    if (datamodule is None) == (train_dataloaders is None):
        raise ValueError("pass exactly one source of training batches: a datamodule or train_dataloaders (got "
                         f"{'both' if datamodule is not None else 'neither'}).")
    began = time.perf_counter()
    optimizer = _single_optimizer(module)
    threshold = stability_threshold(optimizer)
    if threshold is None:
        raise TypeError(_unknown_optimizer(optimizer))
    if is_preconditioned(optimizer) and warmup_steps < 1:
        raise ValueError(f"{type(optimizer).__name__} preconditions by its second-moment state, which exists only after "
                         "a step: pass warmup_steps >= 1 (e.g. 10).")
    if not hasattr(module, "probe_loss") and not hasattr(module, "compute_loss"):
        raise TypeError(f"suggest_learning_rate needs the loss of a batch: {type(module).__name__} has neither "
                        "probe_loss(batch) nor compute_loss(logits, targets). Add `def probe_loss(self, batch): return "
                        "<the training loss of batch>` to it (no logging, no metric updates).")
    reference = float(optimizer.defaults["lr"])
    if not reference > 0:
        raise ValueError(f"the optimizer's lr is {reference!r}; configure a positive one (the suggestion scales it).")
    if datamodule is not None:
        datamodule.prepare_data()
        datamodule.setup("fit")
        train_dataloaders = datamodule.train_dataloader()
    saved = _Snapshot(module)
    device = next(iter(module.parameters())).device
    try:
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            module.train()
            monitor = CurvatureMonitor()  # its loss and its error messages
            stream = _cycle(train_dataloaders)
            for _ in range(warmup_steps):
                batch = _prepare(module, datamodule, next(stream), device)
                optimizer.zero_grad(set_to_none=True)
                monitor._loss(module, batch).backward()
                optimizer.step()
            probe = _concatenate([_prepare(module, datamodule, next(stream), device) for _ in range(batches)])
            eta_lambda = _step_sharpness(module, monitor, probe, optimizer, iterations, device)
    finally:
        saved.restore()
    if not math.isfinite(eta_lambda) or eta_lambda <= 0:
        raise ValueError(f"the largest eigenvalue of the step's curvature η·λ is {eta_lambda:.4g} after "
                         f"{warmup_steps} warm-up steps: curvature sets no limit on the rate here. "
                         "Raise warmup_steps or batches, or use Lightning's Tuner.lr_find.")
    curvature = eta_lambda / reference
    threshold_lr = lr_from_curvature(curvature, optimizer, fraction=1.0)
    return LRSuggestion(lr=fraction * threshold_lr, lambda_max=curvature, threshold_lr=threshold_lr,
                        threshold=threshold, optimizer=_describe(optimizer), fraction=float(fraction),
                        batches=batches, warmup_steps=warmup_steps,
                        seconds=time.perf_counter() - began)

