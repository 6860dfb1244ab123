"""Brightness, contrast, saturation and hue jitter as one per-sample colour transform."""

from __future__ import annotations

import math

import torch
from torch import nn

from traincraft.augment._sample import apply_selected, check_images, check_probability, uniform

_LUMA = torch.tensor([0.299, 0.587, 0.114])
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def colour_matrices(brightness: torch.Tensor, saturation: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Per-sample 3×3 matrices: scale by ``brightness``, blend towards grey by ``saturation`` (1 keeps the colour),
    rotate the chroma plane of YIQ by ``hue`` turns (the linear counterpart of an HSV hue shift)."""
    n = brightness.shape[0]
    eye = torch.eye(3).expand(n, 3, 3)
    grey = torch.ones(3, 1) * _LUMA[None, :]
    saturate = saturation[:, None, None] * eye + (1.0 - saturation)[:, None, None] * grey
    angle = hue * (2.0 * math.pi)
    cos, sin = angle.cos(), angle.sin()
    rotation = torch.zeros(n, 3, 3)
    rotation[:, 0, 0] = 1.0
    rotation[:, 1, 1], rotation[:, 1, 2], rotation[:, 2, 1], rotation[:, 2, 2] = cos, -sin, sin, cos
    rotate = torch.linalg.inv(_RGB_TO_YIQ) @ rotation @ _RGB_TO_YIQ
    return rotate @ saturate * brightness[:, None, None]


class ColorJitter(nn.Module):
    """Per-sample brightness, contrast, saturation and hue changes, applied as one affine colour map per sample.

    Factors are drawn from U(1 - v, 1 + v) (brightness, contrast, saturation) and the hue shift from U(-h, h)
    turns. In a fixed order, brightness scales the pixels, saturation blends with the luma grey, hue rotates the
    YIQ chroma plane, and contrast blends with the image's mean grey level. All four are linear, so they fold into
    one ``A·x + b`` per sample: a single batched matrix product. ``ColorJitter(contrast=0.3)`` alone is the simple
    contrast jitter, and works on grayscale images too; saturation and hue need RGB.

    Args:
        brightness: relative brightness range v.
        contrast: relative contrast range v.
        saturation: relative saturation range v.
        hue: hue shift range in turns, at most 0.5.
        p: probability that a sample is jittered.

    Example:
        >>> import torch
        >>> jitter = ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05)
        >>> jitter(torch.rand(4, 3, 8, 8)).shape
        torch.Size([4, 3, 8, 8])
    """

    def __init__(
        self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0, p: float = 1.0
    ) -> None:
        super().__init__()
        for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1] (factors are drawn from [1 - v, 1 + v]); got {value}.")
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue must lie in [0, 0.5] turns; got {hue}.")
        check_probability("p", p)
        self.brightness, self.contrast, self.saturation, self.hue, self.p = brightness, contrast, saturation, hue, p

    def sample_factors(self, n: int) -> dict[str, torch.Tensor]:
        """Host draws for ``n`` samples: brightness, contrast and saturation factors, hue shift in turns."""
        return {
            "brightness": uniform(n, 1.0 - self.brightness, 1.0 + self.brightness),
            "contrast": uniform(n, 1.0 - self.contrast, 1.0 + self.contrast),
            "saturation": uniform(n, 1.0 - self.saturation, 1.0 + self.saturation),
            "hue": uniform(n, -self.hue, self.hue),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(type(self).__name__, x, channels=3 if (self.saturation or self.hue) else None)
        return apply_selected(x, self.p, lambda v: self.apply(v, self.sample_factors(v.shape[0])))

    def apply(self, x: torch.Tensor, factors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Jitter every sample of ``x`` with the given (host) factors."""
        n, channels = x.shape[:2]
        if channels == 3:
            matrix = colour_matrices(factors["brightness"], factors["saturation"], factors["hue"])
            luma = _LUMA
        else:
            matrix = factors["brightness"].view(n, 1, 1) * torch.eye(channels)
            luma = torch.full((channels,), 1.0 / channels)
        matrix = matrix.to(x.device, x.dtype, non_blocking=True)
        mixed = torch.bmm(matrix, x.flatten(2))
        if self.contrast:
            contrast = factors["contrast"].to(x.device, x.dtype, non_blocking=True)
            grey = mixed.mean(dim=2) @ luma.to(x.device, x.dtype)  # (n,) mean grey level after the colour map
            mixed = mixed.mul_(contrast[:, None, None]).add_(((1.0 - contrast) * grey)[:, None, None])
        return mixed.clamp_(0.0, 1.0).view_as(x)
