"""Dataset statistics computed from the data in one streaming pass."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def channel_moments(batches: Iterable[torch.Tensor], scale: float = 1.0 / 255.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of image batches, in one pass.

    Sums are kept in float64, so the result does not depend on how the data is split into batches (up to
    rounding) and does not lose precision on large data sets.

    Args:
        batches: tensors of shape ``(N, C, H, W)`` (uint8 or float); all must have the same channel count.
        scale: factor applied to the values first (``1/255`` maps uint8 to ``[0, 1]``).

    Returns:
        ``(mean, std)``, float32 tensors of shape ``(C,)``; the population standard deviation.

    Example:
        >>> x = torch.tensor([[[[0, 255]]], [[[255, 255]]]], dtype=torch.uint8)  # 2 images, 1 channel, 1x2
        >>> mean, std = channel_moments([x])
        >>> round(mean.item(), 4), round(std.item(), 4)
        (0.75, 0.433)
    """
    total = sq = None
    count = 0
    for x in batches:
        if x.ndim != 4:
            raise ValueError(f"expected image batches of shape (N, C, H, W); got shape {tuple(x.shape)}")
        x = x.to(torch.float64) * scale
        s, q = x.sum(dim=(0, 2, 3)), x.square().sum(dim=(0, 2, 3))
        if total is None:
            total, sq = s, q
        elif s.shape != total.shape:
            raise ValueError(f"channel count changed between batches: {total.shape[0]} then {s.shape[0]}")
        else:
            total, sq = total + s, sq + q
        count += x.shape[0] * x.shape[2] * x.shape[3]
    if total is None or count == 0:
        raise ValueError("cannot compute statistics of an empty data set; check the training split")
    mean = total / count
    var = (sq / count - mean.square()).clamp_min(0.0)
    return mean.float(), var.sqrt().float()
