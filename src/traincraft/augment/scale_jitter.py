"""The ImageNet scale recipe: per-sample random short side L, then a random fixed-size crop, one resample."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from traincraft.augment._sample import check_images, check_probability, uniform

# Bytes of one block's intermediate on the CPU path: small enough to stay in cache between the two passes.
_CPU_BLOCK_BYTES = 2 << 20


def resize_boxes(
    x: torch.Tensor,
    boxes: torch.Tensor,
    out_h: int,
    out_w: int,
    flip: Optional[torch.Tensor] = None,
    offset: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Bilinearly resize one axis-aligned box per sample to ``out_h × out_w``, optionally mirrored, all at once.

    Boxes are axis-aligned, so the resample is separable: each output row and column reads one source coordinate
    per sample, computed once for the batch. Mirroring reverses the column coordinates, so it costs nothing. Pixels
    outside the image read the nearest edge pixel (``grid_sample``'s ``border`` padding, ``align_corners=False``).

    On an accelerator, or when ``x`` needs gradients, one ``grid_sample`` resamples the whole batch. On the CPU the
    separable form is cheaper: a row pass (``embedding_bag`` blends the two source rows of every output row) and a
    column pass (a one-row ``grid_sample`` whose coordinates are shared by every row of a sample), run block by block
    over the batch so the intermediate stays in cache. Both give the same result to rounding.

    Args:
        x: images (n, C, H, W).
        boxes: (n, 4) host or device rows ``(top, left, height, width)`` in input pixels; fractions are fine.
        out_h: output height.
        out_w: output width.
        flip: optional (n,) bool: mirror these samples left-right.
        offset: optional (n, C) value added to every pixel of each sample and channel as the output is written
            (a colour offset such as fancy-PCA lighting, fused into the resample instead of a pass of its own).

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
    rows = _source_coordinates(boxes[:, 0], boxes[:, 2], height, out_h)
    cols = _source_coordinates(boxes[:, 1], boxes[:, 3], width, out_w)
    if offset is not None:
        offset = offset.to(x.device, x.dtype, non_blocking=True)
    separable = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
    if separable and not (x.requires_grad and torch.is_grad_enabled()):
        return _resample_separable_cpu(x, rows, cols, offset)
    grid = torch.empty(n, out_h, out_w, 2, device=x.device, dtype=x.dtype)
    grid[..., 0] = _normalized(cols, width)[:, None, :]
    grid[..., 1] = _normalized(rows, height)[:, :, None]
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if offset is None:
        return out
    return out + offset[:, :, None, None] if out.requires_grad else out.add_(offset[:, :, None, None])


def _source_coordinates(start: torch.Tensor, length: torch.Tensor, size: int, count: int) -> torch.Tensor:
    """(n, count) source pixel coordinates of ``count`` output pixel centres spread over each box, clamped to the
    image (``border`` padding)."""
    centres = (torch.arange(count, device=start.device, dtype=start.dtype) + 0.5) / count
    return (start[:, None] + centres * length[:, None] - 0.5).clamp_(0.0, size - 1)


def _normalized(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Pixel coordinates to ``grid_sample``'s [-1, 1] (``align_corners=False``)."""
    return (pixels + 0.5) * (2.0 / size) - 1.0


def _row_group(rows: int) -> int:
    """Rows per ``grid_sample`` batch item: a divisor of ``rows`` near 32 (enough to share the column arithmetic,
    small enough to give every thread items), or whole channels-worth when ``rows`` has no such divisor."""
    for group in range(32, 7, -1):
        if rows % group == 0:
            return group
    return rows


def _resample_separable_cpu(
    x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, offset: Optional[torch.Tensor]
) -> torch.Tensor:
    n, channels, height, width = x.shape
    out_h, out_w = rows.shape[1], cols.shape[1]
    out = torch.empty(n, channels, out_h, out_w, dtype=x.dtype)  # not a view: Compose may then modify it in place
    if out.numel() == 0:
        return out
    top = rows.floor().clamp_(0, max(height - 2, 0))
    frac = rows - top  # weight of the lower source row, in [0, 1]
    top = top.long()
    bottom = (top + 1).clamp_(max=height - 1)
    plane = (torch.arange(n * channels) * height).view(n, channels, 1)  # first row of every image plane
    # (n·C·out_h, 2): the two source rows of every output row, and their weights
    pairs = torch.stack([plane + top[:, None, :], plane + bottom[:, None, :]], dim=-1).view(-1, 2)
    weights = torch.stack([1.0 - frac, frac], dim=-1)[:, None].expand(n, channels, out_h, 2).reshape(-1, 2)
    # the column pass: every row of a sample is one "channel" of a 1-pixel-high image, sharing the sample's grid
    # grid_sample splits its work across threads by batch items of ~37 at a time (its grain is set by the grid's
    # size, not the channels'), so each sample's rows are cut into items of `group` rows that share its grid
    group = _row_group(channels * out_h)
    items = channels * out_h // group
    grid = torch.zeros(n, items, out_w, 2, dtype=x.dtype)
    grid[..., 0] = _normalized(cols, width)[:, None, :]
    grid = grid.view(n * items, 1, out_w, 2)
    table = x.reshape(n * channels * height, width)
    block = min(n, max(1, _CPU_BLOCK_BYTES // (channels * out_h * width * x.element_size())))
    per_sample = channels * out_h  # output rows, one bag of two source rows each
    for start in range(0, n, block):  # blocks of samples, so each intermediate is still in cache when read
        stop = min(n, start + block)
        bags = slice(start * per_sample, stop * per_sample)
        blended = F.embedding_bag(pairs[bags], table, per_sample_weights=weights[bags], mode="sum")  # row pass
        torch.ops.aten.grid_sampler_2d.out(  # bilinear, border padding, align_corners=False, into the output
            blended.view(-1, group, 1, width),
            grid[start * items : stop * items],
            0, 1, False,
            out=out[start:stop].view(-1, group, 1, out_w),
        )
        if offset is not None:  # while the block is still in cache
            out[start:stop].add_(offset[start:stop, :, None, None])
    return out


class ScaleJitterCrop(nn.Module):
    """Rescale each sample so its short side is L ~ U[min_size, max_size], then take a random ``size`` crop.

    The ImageNet recipe (Simonyan & Zisserman 2015; He et al. 2016: L ∈ [256, 480], 224 crop). It is batched: each
    sample's crop is a box in the *original* image (side ``size · S / L`` for short side S), and all boxes are
    resampled together (:func:`resize_boxes`: one ``grid_sample`` on an accelerator, a separable two-pass form on the
    CPU): no per-sample loop, no intermediate rescaled images. Mirroring is folded into the same resample at no cost
    (``flip``).

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
        return self.forward_with_offsets(x, None)

    def forward_with_offsets(
        self, x: torch.Tensor, offsets: Optional[Callable[[int, torch.device, torch.dtype], torch.Tensor]]
    ) -> torch.Tensor:
        """:meth:`forward`, then add ``offsets(n, device, dtype)`` (n, C) per sample and channel as the output is
        written: :class:`~traincraft.augment.compose.Compose` fuses a following
        :class:`~traincraft.augment.fancy_pca.FancyPCALighting` this way. The offsets are drawn after this op's own
        parameters, as they would be unfused, so the random stream and the result are the same."""
        check_images(type(self).__name__, x)
        n, _, height, width = x.shape
        flip = torch.rand(n) < self.flip if self.flip > 0 else None
        boxes = self.sample_boxes(n, height, width)
        offset = None if offsets is None else offsets(n, x.device, x.dtype)
        return resize_boxes(x, boxes, self.size, self.size, flip, offset)
