"""The ImageNet scale recipe: per-sample random short side L, then a random fixed-size crop, one resample."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from traincraft.augment._sample import check_images, check_probability, uniform


def resize_boxes(
    x: torch.Tensor, boxes: torch.Tensor, out_h: int, out_w: int, flip: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Bilinearly resize one axis-aligned box per sample to ``out_h × out_w``, optionally mirrored, all at once.

    Boxes are axis-aligned, so the sampling grid is separable: it is filled from per-sample row and column
    coordinates (no ``affine_grid`` matrix product) and one ``grid_sample`` resamples the whole batch. Mirroring
    reverses the column coordinates, so it costs nothing.

    Args:
        x: images (n, C, H, W).
        boxes: (n, 4) host or device rows ``(top, left, height, width)`` in input pixels; fractions are fine.
        out_h: output height.
        out_w: output width.
        flip: optional (n,) bool: mirror these samples left-right.

    Example:
        >>> x = torch.arange(16.0).view(1, 1, 4, 4)
        >>> resize_boxes(x, torch.tensor([[0.0, 0.0, 4.0, 4.0]]), 2, 2).flatten().tolist()
        [2.5, 4.5, 10.5, 12.5]
    """
    n, _, height, width = x.shape
    if flip is not None:  # mirrored: sample the box's columns right to left
        flip = flip.to(boxes.dtype)
        boxes = boxes.clone()
        boxes[:, 1] += flip * boxes[:, 3]
        boxes[:, 3] *= 1.0 - 2.0 * flip
    boxes = boxes.to(x.device, x.dtype, non_blocking=True)
    ys = (torch.arange(out_h, device=x.device, dtype=x.dtype) + 0.5) / out_h
    xs = (torch.arange(out_w, device=x.device, dtype=x.dtype) + 0.5) / out_w
    # pixel centres of the output, mapped into each box, in grid_sample's normalized input coordinates
    gy = (boxes[:, 0:1] + ys * boxes[:, 2:3]) * (2.0 / height) - 1.0
    gx = (boxes[:, 1:2] + xs * boxes[:, 3:4]) * (2.0 / width) - 1.0
    grid = torch.empty(n, out_h, out_w, 2, device=x.device, dtype=x.dtype)
    grid[..., 0] = gx[:, None, :]
    grid[..., 1] = gy[:, :, None]
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class ScaleJitterCrop(nn.Module):
    """Rescale each sample so its short side is L ~ U[min_size, max_size], then take a random ``size`` crop.

    The ImageNet recipe (Simonyan & Zisserman 2015; He et al. 2016: L ∈ [256, 480], 224 crop). It is batched: each
    sample's crop is a box in the *original* image (side ``size · S / L`` for short side S), and all boxes are
    resampled by one ``grid_sample`` (:func:`resize_boxes`): no per-sample loop, no intermediate rescaled images. Mirroring can
    be folded into the same resample at no cost (``flip``).

    Args:
        min_size: smallest short side L.
        max_size: largest short side L.
        size: side of the square output crop; at most ``min_size``.
        flip: probability that a sample is also mirrored left-right.

    Example:
        >>> import torch
        >>> ScaleJitterCrop(min_size=40, max_size=64, size=32)(torch.rand(2, 3, 48, 40)).shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(self, min_size: int = 256, max_size: int = 480, size: int = 224, flip: float = 0.0) -> None:
        super().__init__()
        if not 0 < size <= min_size <= max_size:
            raise ValueError(
                f"need 0 < size <= min_size <= max_size; got size={size}, min_size={min_size}, max_size={max_size}."
            )
        check_probability("flip", flip)
        self.min_size, self.max_size, self.size, self.flip = min_size, max_size, size, flip

    def sample_boxes(self, n: int, height: int, width: int) -> torch.Tensor:
        """Host draws: (n, 4) boxes ``(top, left, height, width)`` in input pixels."""
        side = self.size * min(height, width) / uniform(n, float(self.min_size), float(self.max_size))
        return torch.stack([torch.rand(n) * (height - side), torch.rand(n) * (width - side), side, side], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(type(self).__name__, x)
        n, _, height, width = x.shape
        flip = torch.rand(n) < self.flip if self.flip > 0 else None
        return resize_boxes(x, self.sample_boxes(n, height, width), self.size, self.size, flip)
