"""Random horizontal flip of the selected samples."""

from __future__ import annotations

import torch
from torch import nn

from traincraft.augment._sample import apply_selected, check_images, check_probability


class RandomHorizontalFlip(nn.Module):
    """Mirror each sample left-right with probability ``p``; only the selected samples are copied.

    Args:
        p: probability that a sample is flipped.

    Example:
        >>> import torch
        >>> x = torch.arange(4.0).view(1, 1, 1, 4)
        >>> RandomHorizontalFlip(p=1.0)(x).flatten().tolist()
        [3.0, 2.0, 1.0, 0.0]
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        check_probability("p", p)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(type(self).__name__, x)
        return apply_selected(x, self.p, lambda v: v.flip(-1))
