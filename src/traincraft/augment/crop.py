"""Random crops of a fixed size, gathered for the whole batch at once."""

from __future__ import annotations

from typing import Literal, Union

import torch
import torch.nn.functional as F
from torch import nn

from traincraft.augment._sample import check_images


def gather_crops(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Crop ``(height, width)`` windows at per-sample integer offsets with one gather (no per-sample loop).

    Example:
        >>> x = torch.arange(16.0).view(1, 1, 4, 4)
        >>> gather_crops(x, torch.tensor([1]), torch.tensor([2]), 2, 2).flatten().tolist()
        [6.0, 7.0, 10.0, 11.0]
    """
    n, c, _, full_width = x.shape
    rows = top.to(x.device)[:, None] + torch.arange(height, device=x.device)
    cols = left.to(x.device)[:, None] + torch.arange(width, device=x.device)
    index = (rows[:, :, None] * full_width + cols[:, None, :]).view(n, 1, height * width).expand(n, c, -1)
    return torch.gather(x.flatten(2), 2, index).view(n, c, height, width)


class RandomCrop(nn.Module):
    """A random ``size`` window of every sample, optionally after padding (the CIFAR recipe: pad 4, crop 32).

    Args:
        size: output side, or ``(height, width)``.
        padding: pixels added on every side before cropping.
        padding_mode: ``"constant"`` (zeros), ``"reflect"`` or ``"replicate"``.

    Example:
        >>> import torch
        >>> RandomCrop(24, padding=2)(torch.rand(3, 3, 32, 32)).shape
        torch.Size([3, 3, 24, 24])
    """

    def __init__(
        self,
        size: Union[int, tuple[int, int]],
        padding: int = 0,
        padding_mode: Literal["constant", "reflect", "replicate"] = "constant",
    ) -> None:
        super().__init__()
        size = (size, size) if isinstance(size, int) else tuple(size)
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"size must be a positive int or (height, width); got {size!r}.")
        if padding < 0:
            raise ValueError(f"padding must be >= 0; got {padding}.")
        if padding_mode not in ("constant", "reflect", "replicate"):
            raise ValueError(f"padding_mode must be 'constant', 'reflect' or 'replicate'; got {padding_mode!r}.")
        self.size, self.padding, self.padding_mode = size, padding, padding_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(type(self).__name__, x)
        if self.padding:
            x = F.pad(x, [self.padding] * 4, mode=self.padding_mode)
        n, _, height, width = x.shape
        h, w = self.size
        if h > height or w > width:
            raise ValueError(
                f"RandomCrop of size {self.size} does not fit images of {height}x{width} (after padding "
                f"{self.padding}); resize the images first or choose a smaller size."
            )
        top = torch.randint(0, height - h + 1, (n,))
        left = torch.randint(0, width - w + 1, (n,))
        return gather_crops(x, top, left, h, w)
