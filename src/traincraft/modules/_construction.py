"""ImageClassifier's constructor checks, its model built by name, and its accuracy metrics."""

from __future__ import annotations

from typing import Any, Optional, Union

from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from traincraft.augment.tta import MultiCropAveraging
from traincraft.models import build_model

POLICIES = ("raise", "warn", "skip")


def check_arguments(num_classes: Any, on_nonfinite: Any, label_smoothing: float, optimizer: Any,
                    scheduler: Any) -> None:
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
        raise ValueError(f"num_classes must be an integer >= 2; got {num_classes!r}.")
    if on_nonfinite not in POLICIES:
        raise ValueError(
            f"on_nonfinite must be one of {', '.join(map(repr, POLICIES))}; got {on_nonfinite!r}. 'raise' stops "
            "the fit at the next logging step after a non-finite step, 'warn' and 'skip' go on past it."
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1); got {label_smoothing}.")
    if not callable(optimizer):
        raise TypeError(
            f"optimizer must be a callable that takes parameter groups (an optimizer class or a "
            f"functools.partial of one); got {optimizer!r}."
        )
    if scheduler is not None and not callable(scheduler):
        raise TypeError(f"scheduler must be a callable that takes the optimizer; got {scheduler!r}.")


def make_model(model: Union[str, nn.Module], num_classes: Optional[int], in_channels: Optional[int],
               input_size: Optional[int], model_kwargs: Optional[dict[str, Any]]) -> nn.Module:
    """The module itself, or the one a registered name or dotted class path builds (given the data's sizes)."""
    if isinstance(model, str):
        return _build_named(model, num_classes, in_channels, input_size, model_kwargs or {})
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a model name, a dotted class path or an nn.Module; got {type(model).__name__}.")
    if model_kwargs:
        raise ValueError("model_kwargs apply only to a model built by name; configure the nn.Module directly.")
    return model


def _build_named(name: str, num_classes, in_channels, input_size, kwargs: dict[str, Any]) -> nn.Module:
    if num_classes is None:
        raise ValueError(
            f"num_classes is required to build model {name!r} by name (traincraft fit links it from the data)."
        )
    given = {"num_classes": num_classes, "in_channels": in_channels, "input_size": input_size}
    clash = sorted(set(given) & set(kwargs))
    if clash:
        raise ValueError(f"give {clash} as ImageClassifier arguments, not in model_kwargs.")
    return build_model(name, **kwargs, **{k: v for k, v in given.items() if v is not None})


def check_tta(test_time_augmentation: Any) -> None:
    if test_time_augmentation is not None and not isinstance(test_time_augmentation, MultiCropAveraging):
        raise TypeError(
            "test_time_augmentation must be a traincraft.augment.tta.MultiCropAveraging; got "
            f"{type(test_time_augmentation).__name__}."
        )


def accuracy_metrics(num_classes: int) -> dict[str, MulticlassAccuracy]:
    """Top-1 (and, beyond 5 classes, top-5) accuracy per stage, keyed ``<stage>_acc`` and ``<stage>_acc_top5``."""
    metrics = {}
    # validate_args=False: the argument checks read tensor values, a host sync on every step.
    for stage in ("train", "val", "test"):
        metrics[f"{stage}_acc"] = MulticlassAccuracy(num_classes, top_k=1, validate_args=False)
        if num_classes > 5:
            metrics[f"{stage}_acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, validate_args=False)
    return metrics
