"""Elastic distortion: a smooth random displacement field per sample (Simard, Steinkraus & Platt 2003)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from kornia.filters import get_gaussian_kernel1d
from kornia.geometry.transform import elastic_transform2d
from torch import nn

from traincraft.augment._sample import apply_selected, check_images, check_probability


class RandomElastic(nn.Module):
    """Warp every selected sample by its own smooth random displacement field.

    Simard et al. (2003) found these distortions, which imitate the wobble of a hand, the most useful augmentation
    for handwritten digits. The field is uniform noise in ``[-1, 1]`` per pixel and axis, smoothed by a Gaussian,
    and scaled so that its standard deviation is ``magnitude`` (a fraction of the image side); kornia's
    ``elastic_transform2d`` applies it in one batched resample. Both parameters are fractions of the side, so one
    setting means the same distortion at 16 or 224 pixels.

    The noise is drawn on the device with the device's default generator, which the DataModule seeds per batch.

    Args:
        magnitude: standard deviation of the displacement, as a fraction of the image side (0.02 at 32 pixels is
            about 0.6 pixel).
        smoothness: standard deviation of the Gaussian that smooths the field, as a fraction of the image side:
            the length over which neighbouring pixels move together.
        p: probability that a sample is distorted.
        padding_mode: what fills pixels that come from outside the image.

    Example:
        >>> x = torch.rand(4, 1, 32, 32)
        >>> y = RandomElastic(magnitude=0.02, smoothness=0.15)(x)
        >>> y.shape, bool((y != x).any())
        (torch.Size([4, 1, 32, 32]), True)
    """

    def __init__(self, magnitude: float = 0.02, smoothness: float = 0.15, p: float = 1.0,
                 padding_mode: Literal["zeros", "border", "reflection"] = "zeros") -> None:
        super().__init__()
        if not magnitude >= 0:
            raise ValueError(f"magnitude must be >= 0 (a fraction of the image side); got {magnitude}.")
        if not 0 < smoothness <= 1:
            raise ValueError(f"smoothness must lie in (0, 1] (a fraction of the image side); got {smoothness}.")
        if padding_mode not in ("zeros", "border", "reflection"):
            raise ValueError(f"padding_mode must be 'zeros', 'border' or 'reflection'; got {padding_mode!r}.")
        check_probability("p", p)
        self.magnitude, self.smoothness, self.p, self.padding_mode = float(magnitude), float(smoothness), p, padding_mode
        self._parameters_by_size: dict[tuple[int, int], tuple[int, float, float]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(type(self).__name__, x)
        return apply_selected(x, self.p, self._warp)

    def field_parameters(self, height: int, width: int) -> tuple[int, float, float]:
        """Kernel size and σ of the smoothing (pixels), and kornia's ``alpha`` that gives the displacement the
        standard deviation ``magnitude`` (kornia measures displacements in normalized coordinates, 2/side)."""
        side = min(height, width)
        sigma = max(self.smoothness * side, 0.5)
        size = min(2 * math.ceil(3 * sigma) + 1, side if side % 2 else side - 1)
        kernel = get_gaussian_kernel1d(size, sigma)
        # uniform noise in [-1, 1] has variance 1/3; a separable filter multiplies it by (Σk²)²
        field_std = math.sqrt(1.0 / 3.0) * float(kernel.square().sum())
        return size, sigma, 2.0 * self.magnitude / field_std

    def _warp(self, x: torch.Tensor) -> torch.Tensor:
        n, _, height, width = x.shape
        if (height, width) not in self._parameters_by_size:  # a kernel on the host, once per image size
            self._parameters_by_size[(height, width)] = self.field_parameters(height, width)
        size, sigma, alpha = self._parameters_by_size[(height, width)]
        noise = torch.rand(n, 2, height, width, device=x.device, dtype=x.dtype).mul_(2).sub_(1)
        return elastic_transform2d(x, noise, kernel_size=(size, size), sigma=(sigma, sigma), alpha=(alpha, alpha),
                                   padding_mode=self.padding_mode)
