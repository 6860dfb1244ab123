"""ImageClassifier's label checks: types and shapes at once (free), ranges on the device (read at logging steps)."""

from __future__ import annotations

from typing import Any, Optional

import torch


def check_label_format(targets: Any, batch: int, num_classes: Optional[int]) -> torch.Tensor:
    """Integer class indices of shape ``(batch,)`` as int64; raises on anything else (a dtype and shape check)."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"labels must be a tensor of class indices; got {type(targets).__name__}. Return "
                        "(images, labels) batches with int64 labels of shape (batch,).")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(
            f"labels must be integer class indices in [0, {num_classes}); got dtype {targets.dtype}. "
            "Convert class indices with labels.long(); for one-hot or soft labels pass labels.argmax(1), or "
            "override per_example_loss for soft targets."
        )
    if targets.shape != (batch,):
        hint = " (one-hot labels? pass labels.argmax(1))" if targets.ndim == 2 and targets.shape[0] == batch else ""
        raise ValueError(f"labels must have shape ({batch},), one class index per image; got shape "
                         f"{tuple(targets.shape)}{hint}.")
    return targets.long()


def label_message(num_classes: Optional[int], low: int, high: int, where: str) -> str:
    return (
        f"labels must lie in [0, {num_classes}) for num_classes={num_classes}; found labels in "
        f"[{low}, {high}] in {where}. Set num_classes to the data's number of classes (more than {high}), or fix the "
        "labels (class indices start at 0)."
    )


class EvalLabelRange:
    """The smallest and largest label of an evaluation epoch, kept on the device and read once at its end."""

    def __init__(self) -> None:
        self._range: Optional[torch.Tensor] = None

    def start(self, device: torch.device) -> None:
        self._range = torch.tensor([2**62, -(2**62)], device=device)

    def note(self, targets: torch.Tensor) -> None:
        if self._range is not None and targets.numel():
            low_seen, high_seen = torch.aminmax(targets)
            torch.minimum(self._range[0], low_seen, out=self._range[0])
            torch.maximum(self._range[1], high_seen, out=self._range[1])

    def end(self, num_classes: int, stage: str) -> None:
        if self._range is None:
            return
        low, high = self._range.tolist()  # sync point: once per evaluation epoch
        self._range = None
        if low <= high and (low < 0 or high >= num_classes):  # low > high: no labelled batch
            raise ValueError(label_message(num_classes, low, high, f"the {stage} data"))
