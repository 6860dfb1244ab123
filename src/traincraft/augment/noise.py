"""Additive Gaussian pixel noise."""

from __future__ import annotations

import torch
from torch import nn

from traincraft.augment._sample import apply_selected, check_images, check_probability


class GaussianNoise(nn.Module):
    """Add N(0, std²) noise to every pixel of the selected samples, then clamp to ``[0, 1]``.

    The noise is drawn on the device with the device's default generator, which the DataModule seeds per batch
    together with the host generator: no image-sized tensor crosses from the host.

    Args:
        std: standard deviation of the noise (images are in ``[0, 1]``).
        p: probability that a sample receives noise.

    Example:
        >>> import torch
        >>> x = torch.full((2, 1, 8, 8), 0.5)
        >>> y = GaussianNoise(std=0.1, p=1.0)(x)
        >>> bool((y != x).any()), float(y.min()) >= 0.0
        (True, True)
    """

    def __init__(self, std: float = 0.03, p: float = 1.0) -> None:
        super().__init__()
        if std < 0:
            raise ValueError(f"std must be >= 0; got {std}.")
        check_probability("p", p)
        self.std, self.p = float(std), p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(type(self).__name__, x)
        return apply_selected(x, self.p, self._noise)

    def forward_(self, x: torch.Tensor) -> torch.Tensor:
        """In place on ``x`` (used by :class:`~traincraft.augment.compose.Compose` on batches it owns)."""
        if self.p < 1.0:
            return self(x)
        check_images(type(self).__name__, x)
        return x.add_(torch.randn_like(x), alpha=self.std).clamp_(0.0, 1.0)

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        return x.add(torch.randn_like(x), alpha=self.std).clamp_(0.0, 1.0)
