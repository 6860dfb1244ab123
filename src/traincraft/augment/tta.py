"""Test-time averaging: the softmax averaged over rescaled, cropped and mirrored views, in bounded chunks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn


class MultiCropAveraging(nn.Module):
    """Average a classifier's softmax over views of each image: several scales, five crops, their mirror images.

    The recipe of the lecture (and of Krizhevsky et al. 2012, Simonyan & Zisserman 2015): resize so the short side
    is each of ``scales`` (for example 224, 256, 384, 480, 640), take ``crop_size`` crops at the four corners and
    the centre, add their horizontal mirrors (10 crops per scale), and average the softmax. Views are batched
    across images and crops and fed to the model in chunks of at most ``chunk_size`` images, so memory stays
    bounded whatever the number of views. ``MultiCropAveraging(crops="none")`` is the cheap flip-only variant
    (the image and its mirror).

    Args:
        scales: short sides to resize to; ``None`` keeps the input size (one scale).
        crop_size: side of the square crops; required unless ``crops="none"``.
        crops: ``"five"`` (corners and centre), ``"center"`` or ``"none"`` (the whole image).
        flip: also evaluate the mirror image of every view.
        chunk_size: most images per model call.

    Example:
        >>> import torch
        >>> tta = MultiCropAveraging(scales=[16, 20], crop_size=16)  # 2 scales x 10 crops
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(5))
        >>> probs = tta(model, torch.rand(3, 3, 16, 16))
        >>> tta.num_views, tuple(probs.shape), bool(torch.allclose(probs.sum(1), torch.ones(3)))
        (20, (3, 5), True)
    """

    def __init__(
        self,
        scales: Optional[list[int]] = None,
        crop_size: Optional[int] = None,
        crops: Literal["five", "center", "none"] = "five",
        flip: bool = True,
        chunk_size: int = 256,
    ) -> None:
        super().__init__()
        if crops not in ("five", "center", "none"):
            raise ValueError(f"crops must be 'five', 'center' or 'none'; got {crops!r}.")
        if crops != "none" and (crop_size is None or crop_size <= 0):
            raise ValueError(f"crops={crops!r} needs a positive crop_size; got {crop_size!r} (or set crops='none').")
        if scales is not None and (not scales or any(s <= 0 for s in scales)):
            raise ValueError(f"scales must be a non-empty list of positive sizes, or None; got {scales!r}.")
        if scales is not None and crop_size is not None and crops != "none" and min(scales) < crop_size:
            raise ValueError(f"every scale must be at least crop_size={crop_size}; got scales={scales}.")
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive; got {chunk_size}.")
        self.scales, self.crop_size, self.crops, self.flip, self.chunk_size = scales, crop_size, crops, flip, chunk_size

    @property
    def num_views(self) -> int:
        per_scale = {"five": 5, "center": 1, "none": 1}[self.crops] * (2 if self.flip else 1)
        return per_scale * (len(self.scales) if self.scales else 1)

    def views(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """Every view of the batch, one ``(N, C, h, w)`` tensor at a time (crops are slices: no copies)."""
        for scale in self.scales or [None]:
            image = x if scale is None else _resize_short_side(x, scale)
            height, width = image.shape[-2:]
            if self.crops != "none" and (height < self.crop_size or width < self.crop_size):
                raise ValueError(
                    f"images of {height}x{width} are smaller than crop_size={self.crop_size}; set scales (to resize "
                    "first) or a smaller crop_size."
                )
            for crop in self._crops(image):
                yield crop
                if self.flip:
                    yield crop.flip(-1)

    def _crops(self, image: torch.Tensor) -> Iterator[torch.Tensor]:
        if self.crops == "none":
            yield image
            return
        c = self.crop_size
        height, width = image.shape[-2:]
        top, left = (height - c) // 2, (width - c) // 2
        yield image[..., top : top + c, left : left + c]
        if self.crops == "five":
            for t, s in ((0, 0), (0, width - c), (height - c, 0), (height - c, width - c)):
                yield image[..., t : t + c, s : s + c]

    def forward(self, model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The softmax of ``model`` averaged over all views of ``x`` (N, C, H, W): probabilities (N, classes)."""
        if x.ndim != 4 or not x.dtype.is_floating_point:
            raise ValueError(f"expected float images (N, C, H, W); got a {x.dtype} tensor of shape {tuple(x.shape)}.")
        n = x.shape[0]
        total: Optional[torch.Tensor] = None
        pending: list[torch.Tensor] = []
        pending_rows: list[torch.Tensor] = []
        filled = 0

        def flush() -> None:
            nonlocal total, filled
            probs = model(torch.cat(pending)).float().softmax(dim=-1)
            rows = torch.cat(pending_rows)
            total = torch.zeros(n, probs.shape[-1], device=x.device) if total is None else total
            total.index_add_(0, rows, probs)
            pending.clear()
            pending_rows.clear()
            filled = 0

        for view in self.views(x):
            for start in range(0, n, self.chunk_size):
                piece = view[start : start + self.chunk_size]
                if pending and (filled + piece.shape[0] > self.chunk_size or piece.shape[1:] != pending[0].shape[1:]):
                    flush()
                pending.append(piece)
                pending_rows.append(torch.arange(start, start + piece.shape[0], device=x.device))
                filled += piece.shape[0]
        flush()
        return total / self.num_views


def _resize_short_side(x: torch.Tensor, size: int) -> torch.Tensor:
    height, width = x.shape[-2:]
    factor = size / min(height, width)
    target = (max(size, round(height * factor)), max(size, round(width * factor)))
    if target == (height, width):
        return x
    return F.interpolate(x, size=target, mode="bilinear", align_corners=False, antialias=factor < 1)
